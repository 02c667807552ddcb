"""Run a command and report the peak memory of its whole process tree (the command and every process it starts).

    python scripts/tree_memory.py [--interval-ms 100] [--pss] [--json out.json] -- tpo-lite run examples/smollm2_cpu.toml

Every interval it sums the RSS (``VmRSS`` of /proc/<pid>/status) over the tree: an upper bound of the physical
memory the tree holds, since a page shared by two processes (a library's code) counts in both. It also keeps
the largest single process's RSS (what ``/usr/bin/time`` reports). ``--pss`` sums the proportional set size
instead (``Pss`` of /proc/<pid>/smaps_rollup: a page shared by n processes counts 1/n in each), which is exact
but walks every page table: on a 2 GB process every 100 ms it took ~14% of a core and slowed the measured run,
so the default reads only the kernel's counters. A sampled peak can miss a spike shorter than the interval;
each process's own ``VmHWM`` (read at its last sample) bounds that from the other side. Linux only.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from tpo_lite.memory import proc_kb


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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--interval-ms", type=float, default=100.0)
    ap.add_argument("--pss", action="store_true", help="sum PSS (exact, costly) instead of RSS (an upper bound)")
    ap.add_argument("--json", default="", help="write the result here too")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    a = ap.parse_args(argv)
    cmd = a.command[1:] if a.command[:1] == ["--"] else a.command
    if not cmd:
        ap.error("no command given (put it after --)")
    what = "PSS" if a.pss else "RSS"
    t0 = time.time()
    proc = subprocess.Popen(cmd)
    peak_sum, peak_at, peak_n, peak_rss, hwm = 0, 0.0, 0, 0, {}
    while proc.poll() is None:
        total, n = 0, 0
        for pid in _tree(proc.pid):
            rss = proc_kb("VmRSS", f"/proc/{pid}/status")
            h = proc_kb("VmHWM", f"/proc/{pid}/status")
            part = proc_kb("Pss", f"/proc/{pid}/smaps_rollup") if a.pss else rss
            if part is not None:
                total += part
                n += 1
            if rss is not None:
                peak_rss = max(peak_rss, rss)
            if h is not None:
                hwm[pid] = max(hwm.get(pid, 0), h)
        if total > peak_sum:
            peak_sum, peak_at, peak_n = total, time.time() - t0, n
        time.sleep(a.interval_ms / 1000)
    res = {"command": cmd, "returncode": proc.returncode, "seconds": round(time.time() - t0, 1),
           "interval_ms": a.interval_ms, "summed": what, "peak_tree_mb": round(peak_sum / 1024, 1),
           "peak_tree_at_s": round(peak_at, 1), "processes_at_peak": peak_n,
           "peak_process_rss_mb": round(peak_rss / 1024, 1),
           "largest_process_hwm_mb": round(max(hwm.values(), default=0) / 1024, 1), "processes_seen": len(hwm)}
    print(json.dumps(res), file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
