"""Run a command and report the peak memory of its whole process tree (the command and every process it starts).

    python scripts/tree_memory.py [--interval-ms 20] [--json out.json] -- tpo-lite run examples/smollm2_cpu.toml

Every interval it sums the proportional set size (``Pss`` of /proc/<pid>/smaps_rollup: a page shared by n
processes counts 1/n in each, so the sum is the physical memory the tree holds) over the tree, and also keeps the
largest single process's RSS (what ``/usr/bin/time`` reports). A sampled peak can miss a spike shorter than the
interval; each process's own ``VmHWM`` (read at its last sample) bounds that from the other side. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _children(pid: int) -> list[int]:
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(x) for x in f.read().split()]
    except OSError:
        pass
    return out


def _tree(root: int) -> list[int]:
    seen, todo = [], [root]
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += _children(pid)
    return seen


def _kb(path: str, key: str) -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument("--json", default="", help="write the result here too")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given (put it after --)")
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peak_pss, peak_pss_at, peak_pss_n, peak_rss, hwm = 0, 0.0, 0, 0, {}
    while proc.poll() is None:
        total, n = 0, 0
        for pid in _tree(proc.pid):
            pss = _kb(f"/proc/{pid}/smaps_rollup", "Pss")
            rss = _kb(f"/proc/{pid}/status", "VmRSS")
            h = _kb(f"/proc/{pid}/status", "VmHWM")
            if pss is not None:
                total += pss
                n += 1
            if rss is not None:
                peak_rss = max(peak_rss, rss)
            if h is not None:
                hwm[pid] = max(hwm.get(pid, 0), h)
        if total > peak_pss:
            peak_pss, peak_pss_at, peak_pss_n = total, time.time() - t0, n
        time.sleep(a.interval_ms / 1000)
    res = {"command": cmd, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
           "interval_ms": a.interval_ms, "peak_tree_pss_mb": round(peak_pss / 1024, 1),
           "peak_tree_pss_at_s": round(peak_pss_at, 1), "processes_at_peak": peak_pss_n,
           "peak_process_rss_mb": round(peak_rss / 1024, 1),
           "largest_process_hwm_mb": round(max(hwm.values(), default=0) / 1024, 1), "processes_seen": len(hwm)}
    print(json.dumps(res), file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
