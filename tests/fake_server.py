"""The one fake HTTP server of the tests (OpenAI-compatible judges, the vLLM-like sampling server): it records
each POST and answers every request with a reply function, so a test says only how the server answers."""
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, NamedTuple, Optional


class Request(NamedTuple):
    """One POST the server received: its path, its JSON body and its Authorization header."""

    path: str
    body: dict
    auth: Optional[str]


# reply(method, path, body) -> (HTTP status, payload): a payload of bytes is sent as it is, anything else as JSON;
# body is None for a GET.
Reply = Callable[[str, str, Optional[dict]], tuple[int, Any]]


class FakeServer:
    """A server on 127.0.0.1 (a free port), started at once; ``url`` is its ``.../v1`` base, ``requests`` the
    POSTs it received (Request), ``close()`` (or leaving a ``with`` block) stops it."""

    def __init__(self, reply: Reply):
        self.reply = reply
        self.requests: list[Request] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, body):
                status, payload = outer.reply(self.command, self.path, body)
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(Request(self.path, body, self.headers.get("Authorization")))
                self._answer(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def shown_pair(judge_prompt: str) -> tuple[str, str]:
    """Responses A and B as the default pairwise judge prompt shows them."""
    a = re.search(r"\[Response A\]\n(.*?)\n\n\[Response B\]", judge_prompt, re.S).group(1)
    b = re.search(r"\[Response B\]\n(.*?)\n\nWhich", judge_prompt, re.S).group(1)
    return a, b


def louder(judge_prompt: str) -> str:
    """A fake judge's verdict on a pairwise prompt: "A" or "B", the response with more '!' (A on a tie)."""
    a, b = shown_pair(judge_prompt)
    return "A" if a.count("!") >= b.count("!") else "B"
