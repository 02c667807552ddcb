"""Crash-safe JSONL records and atomic JSON files.

Guarantees under ``kill -9`` (or power loss after fsync) at any instant:

* **No torn record is ever read.** A record is one JSON object plus ``"\\n"`` written by a single ``os.write``
  on an ``O_APPEND`` descriptor, then ``fsync``. If the process dies mid-write the file may end with a partial
  line that has no ``"\\n"``; :func:`read_records` ignores such a last line and :func:`append_record` truncates
  it (:func:`repair`) before it appends, so a torn tail never becomes a corrupt middle line.
* **No lost record.** The caller appends a record only after the work it describes is finished; a kill before
  the append means the work is simply redone on resume. After the append returns the line is on disk.
* **No duplicated record.** Records are keyed (e.g. ``prompt_id``); the loop reads the keys already present and
  never writes a key twice. :func:`read_records` with ``key=`` rejects duplicates as corruption.
* **A record file is the run's own regular file.** A symbolic link (or a FIFO, a device ...) in its place is
  refused with an error naming it: the torn-tail repair would otherwise truncate and append to whatever the
  link points at, and a reader would silently take another run's records.
* Whole-file outputs (``metrics.json``, ``DONE`` markers, the resolved config) go through
  :func:`write_json_atomic` / :func:`write_text_atomic`: write a temp file, fsync, ``os.replace`` over the
  target, fsync the directory. A reader sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from typing import Any, BinaryIO, Callable, Iterable

from .errors import TpoError


def _fsync_dir(path: str) -> None:
    # The directory entry of a new/renamed file must be durable too, not only its contents.
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_record_file(path: str, flags: int, allow_symlink: bool = False) -> int:
    """``os.open`` a record file, refusing a symbolic link (unless allowed) and anything but a regular file.

    O_NOFOLLOW makes the check race-free; O_NONBLOCK keeps a FIFO from blocking the open forever.
    """
    flags |= os.O_NONBLOCK | (0 if allow_symlink else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP and not allow_symlink and os.path.islink(path):
            raise TpoError("is a symbolic link; a record file must be a regular file of its own (replace the "
                           "link with a copy of the file)", path=path) from None
        if isinstance(e, FileNotFoundError):
            raise
        raise TpoError(f"cannot open the record file: {e.strerror or e}", path=path) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TpoError("not a regular file; a record file must be a regular file", path=path)
    return fd


def _naming(e: OSError, path: str) -> OSError:
    """``e`` with ``path`` as its file: os.write / os.fsync errors (a full disk) name no file on their own."""
    return e if e.filename else OSError(e.errno, e.strerror, path)


def repair(path: str | os.PathLike) -> int:
    """Truncate a torn last line (one without a trailing ``"\\n"``) from ``path``.

    Returns the number of bytes removed (0 when the file is missing, empty or already ends in ``"\\n"``).
    A symbolic link or a non-regular file is refused (:class:`TpoError`), never truncated through.
    """
    path = os.fspath(path)
    try:
        fd = _open_record_file(path, os.O_RDWR)
    except FileNotFoundError:
        return 0
    with os.fdopen(fd, "rb+") as f:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        # Scan backwards in blocks for the last newline; everything after it is the torn tail.
        pos, keep = size, 0
        block = 1 << 16
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            idx = chunk.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
        return size - keep


def append_record(path: str | os.PathLike, obj: Any) -> None:
    """Append ``obj`` as one JSON line, durably (single write on an O_APPEND fd, then fsync).

    A torn tail left by an earlier crash is truncated first, so the new line starts on a line boundary. A
    symbolic link or a non-regular file at ``path`` is refused (:class:`TpoError`).
    """
    path = os.fspath(path)
    data = (json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8")
    created = not os.path.lexists(path)
    repair(path)
    fd = _open_record_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        view = memoryview(data)
        # One write normally writes everything for a regular file; loop only for the rare short write
        # (a kill in between leaves a torn tail, which readers drop and the next append repairs).
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except OSError as e:
        raise _naming(e, path) from None
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path)


def read_records(path: str | os.PathLike, key: str | None = None, allow_symlink: bool = False,
                 required: Iterable[str] = ()):
    """Read a JSONL file written by :func:`append_record`.

    Returns a list of objects, or with ``key`` a dict ``{record[key]: record}`` in file order. A missing file
    reads as empty. A last line without ``"\\n"`` is a torn write and is dropped. A complete line that is not a
    JSON object, lacks ``key`` or one of the ``required`` keys (``"a[].b"``: key ``b`` of every object in list
    ``a``), or repeats a key raises :class:`TpoError` with the file, line number and field. A symbolic link is
    refused unless ``allow_symlink`` (for input files of the user's, not a run's records).
    """
    path = os.fspath(path)
    try:
        fd = _open_record_file(path, os.O_RDONLY, allow_symlink)
    except FileNotFoundError:
        return {} if key is not None else []
    with os.fdopen(fd, "rb") as f:
        raw = f.read()
    lines = raw.split(b"\n")
    # After split, the last element is b"" when the file ends in "\n", otherwise it is the torn tail.
    complete = lines[:-1]
    records = [] if key is None else {}
    for lineno, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TpoError(f"not valid JSON ({e})", path=path, line=lineno) from None
        if not isinstance(obj, dict):
            raise TpoError(f"expected a JSON object, got {type(obj).__name__}", path=path, line=lineno)
        gap = _missing_key(obj, required)
        if gap is not None:
            raise TpoError(gap[1], path=path, line=lineno, field=gap[0])
        if key is None:
            records.append(obj)
            continue
        if key not in obj:
            raise TpoError("missing key", path=path, line=lineno, field=key)
        k = obj[key]
        if k in records:
            raise TpoError(f"duplicate record {k!r}", path=path, line=lineno, field=key)
        records[k] = obj
    return records


def _missing_key(obj: dict, required: Iterable[str]) -> tuple[str, str] | None:
    """(field, problem) of the first of ``required`` that ``obj`` lacks (see :func:`read_records`), else None:
    here, with file and line, rather than as a KeyError wherever the record is used."""
    for name in required:
        head, _, sub = name.partition("[].")
        if head not in obj:
            return head, "missing key"
        if sub:
            items = obj[head]
            if not isinstance(items, list):
                return head, f"expected a list, got {type(items).__name__}"
            for i, item in enumerate(items):
                if not isinstance(item, dict) or sub not in item:
                    return f"{head}[{i}].{sub}", "missing key"
    return None


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (see :func:`write_atomic`)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Replace ``path`` with what ``write`` writes to a binary file, atomically: a temp file in the same dir
    (``.<name>.*.tmp``), fsync, os.replace; a kill leaves the old file or the new one."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=d)
    except OSError as e:  # named as the file it was to replace, not the random temp name
        raise OSError(e.errno, e.strerror, path) from None
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; results are ordinary files that others may read
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror, path) from None
        raise
    _fsync_dir(path)


def write_json_atomic(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Replace ``path`` with ``obj`` as JSON atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def read_text_utf8(path: str | os.PathLike) -> str:
    """The text of ``path``; bytes that are not UTF-8 raise :class:`TpoError` naming the file and line."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TpoError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x})", path=path,
                       line=raw.count(b"\n", 0, e.start) + 1) from None


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; a malformed one raises :class:`TpoError` naming the file and line."""
    path = os.fspath(path)
    text = read_text_utf8(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TpoError(f"not valid JSON: {e.msg}", path=path, line=e.lineno) from None
