import os
import signal
import subprocess
import sys
import time

import pytest

from tpo_lite.errors import TpoError
from tpo_lite.jsonl import append_record, read_json, read_records, repair, write_json_atomic


def test_roundtrip_and_key(tmp_path):
    p = tmp_path / "a.jsonl"
    assert read_records(p) == []
    assert read_records(p, key="id") == {}
    for i in range(3):
        append_record(p, {"id": f"x{i}", "v": i, "s": "é\n"})
    assert [r["v"] for r in read_records(p)] == [0, 1, 2]
    recs = read_records(p, key="id")
    assert list(recs) == ["x0", "x1", "x2"] and recs["x1"]["s"] == "é\n"
    assert p.read_bytes().count(b"\n") == 3  # embedded newlines are escaped: one line per record


def test_torn_tail_dropped_and_repaired(tmp_path):
    p = tmp_path / "a.jsonl"
    append_record(p, {"id": 1})
    with open(p, "ab") as f:
        f.write(b'{"id": 2, "tru')  # a kill in the middle of a write
    assert read_records(p) == [{"id": 1}]
    assert repair(p) == len(b'{"id": 2, "tru')
    assert repair(p) == 0
    with open(p, "ab") as f:
        f.write(b'{"id": 3')
    append_record(p, {"id": 4})  # append repairs the torn tail before writing
    assert read_records(p) == [{"id": 1}, {"id": 4}]
    assert p.read_bytes() == b'{"id":1}\n{"id":4}\n'


def test_torn_only_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_bytes(b'{"id"')
    assert read_records(p) == []
    append_record(p, {"id": 0})
    assert p.read_bytes() == b'{"id":0}\n'


def test_malformed_complete_line_names_file_and_line(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1}\n\n{"id": 2,,}\n{"id": 3}\n')
    with pytest.raises(TpoError) as e:
        read_records(p)
    assert e.value.path == str(p) and e.value.line == 3
    assert str(e.value).startswith(f"{p}:3: not valid JSON")
    p.write_text('{"id": 1}\n[1, 2]\n')
    with pytest.raises(TpoError, match=r":2: expected a JSON object"):
        read_records(p)


def test_key_errors(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"id": 1}\n{"other": 1}\n')
    with pytest.raises(TpoError) as e:
        read_records(p, key="id")
    assert str(e.value) == f"{p}:2: id: missing key"
    p.write_text('{"id": 1}\n{"id": 1}\n')
    with pytest.raises(TpoError, match=r":2: id: duplicate record 1"):
        read_records(p, key="id")


def test_write_json_atomic(tmp_path):
    p = tmp_path / "sub" / "m.json"
    write_json_atomic(p, {"a": 1})
    write_json_atomic(p, {"a": [1, 2]})
    assert read_json(p) == {"a": [1, 2]}
    assert os.listdir(p.parent) == ["m.json"]  # no temp files left
    assert (os.stat(p).st_mode & 0o777) == 0o644
    p.write_text('{\n "a": 1,\n}\n')
    with pytest.raises(TpoError, match=r"m.json:3: not valid JSON"):
        read_json(p)


_WRITER = r"""
import sys
from tpo_lite.jsonl import append_record, read_records
path = sys.argv[1]
n = len(read_records(path, key="i"))
pad = "x" * 20000  # large lines make a kill mid-write likely
print("ready", flush=True)
while True:
    append_record(path, {"i": n, "pad": pad})
    n += 1
"""


def test_kill9_during_appends_never_tears_or_duplicates(tmp_path):
    p = tmp_path / "k.jsonl"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    for round_ in range(4):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(p)], stdout=subprocess.PIPE, env=env)
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(0.15 + 0.05 * round_)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recs = read_records(p, key="i")  # raises on a corrupt middle line or a duplicated key
        assert list(recs) == list(range(len(recs)))  # contiguous: nothing lost, nothing twice
        assert all(len(r["pad"]) == 20000 for r in recs.values())
    assert len(recs) > 4
