"""JSON requests with bounded retries (stdlib urllib): the one HTTP client of the OpenAI-compatible sampler and
the server judge.

A connection error, a timeout, HTTP 408 / 429 / 5xx and an answer that ``parse`` refuses are retried, retry r
after ``backoff_s * 2**r`` seconds; any other HTTP error is a client error that retrying will not heal.
"""
from __future__ import annotations

import http.client
import json
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Callable


class HTTPFailure(Exception):
    """:func:`request` gave up: ``refused`` (a client error, not retried) or out of tries; ``last``: the last
    error, e.g. ``"HTTP 503: overloaded"``."""

    def __init__(self, last: str, refused: bool):
        super().__init__(last)
        self.last, self.refused = last, refused


def request(url: str, body: dict | None = None, *, method: str = "POST", api_key: str | None = None,
            timeout_s: float, max_retries: int, backoff_s: float,
            parse: Callable[[bytes], Any] | None = None) -> Any:
    """The answer's bytes, or ``parse(bytes)`` (a ``ValueError`` of it is a failed try); ``body`` is sent as
    JSON, ``api_key`` as a Bearer token. Raises :class:`HTTPFailure`."""
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = json.dumps(body).encode() if body is not None else None
    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        try:
            req = urllib.request.Request(url, data=data, headers=headers, method=method)
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}: {_error_detail(e)}"
            if e.code not in (408, 429) and e.code < 500:
                raise HTTPFailure(last, refused=True) from None
            continue
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, (TimeoutError, socket.timeout)) or isinstance(e, (TimeoutError, socket.timeout)):
                last = f"no answer within timeout_s={timeout_s:g}s"
            else:
                last = f"{type(reason).__name__}: {reason}"
            continue
        if parse is None:
            return raw
        try:
            return parse(raw)
        except ValueError as e:
            last = f"{type(e).__name__}: {e}"
    raise HTTPFailure(last, refused=False)


def _error_detail(e: urllib.error.HTTPError) -> str:
    """The error message of an HTTP error's body (``message`` or ``error.message`` of a JSON body, else the
    text), at most 300 characters."""
    try:
        raw = e.read()
    except Exception:  # noqa: BLE001 - the body is only for the message
        raw = b""
    try:
        data = json.loads(raw)
        msg = data.get("message") or (data.get("error") or {}).get("message") if isinstance(data, dict) else None
        if msg:
            return str(msg)[:300]
    except (ValueError, AttributeError):
        pass
    return raw.decode("utf-8", "replace").strip()[:300] or (e.reason or "")
