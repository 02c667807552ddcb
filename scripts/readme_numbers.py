#!/usr/bin/env python3
"""Tie the README's measured numbers to the run (commit, machine, command) they come from.

    # after a measured run: keep what it measured, with where and how
    python scripts/readme_numbers.py record RUN_DIR --command "..." --wall-seconds 1234 --load "idle" \
        --out docs/measured/main_command.json
    # the README's tables, rendered from that record (tests/test_readme_numbers.py checks the README holds them)
    python scripts/readme_numbers.py render docs/measured/main_command.json
    # runs of one recipe that differ only in their seeds, summarised as `tpo-lite seeds` does (per run and over
    # runs; docs/measured/HISTORY.md holds the previous recipe's, which the tests check likewise)
    python scripts/readme_numbers.py seeds 0=docs/measured/main_command.json 1=docs/measured/recipe_seed1.json
    # the direct-response experiment (`tpo-lite experiment`): its Table 1 and both runs' held-out scores
    python scripts/readme_numbers.py experiment runs/direct_vs_tpo --command "..." --wall-seconds 1234 \
        --load "idle" --out docs/measured/direct_vs_tpo.json
    python scripts/readme_numbers.py render-experiment docs/measured/direct_vs_tpo.json
    # a record made before this script kept something it keeps now (e.g. the held-out items): made again from its run
    python scripts/readme_numbers.py refresh docs/measured/main_command.json runs/smollm2_cpu

The record holds the run's summary.json, the held-out results with their per-instruction scores (the change is
re-derived from them), the held-out results' ``environment`` (the machine and library versions: greedy outputs
of one commit differ between CPUs, see tpo_lite/fingerprint.py) and the commit. Numbers in the README that do
not come out of ``render`` are not measured numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _slim(result: dict | None) -> dict | None:
    if result is None:
        return None
    return {k: v for k, v in result.items() if k not in ("items",)}


def _with_items(run_dir: Path, result: dict | None) -> dict | None:
    """``result`` (a held-out result as summary.json keeps it, without its per-instruction items) with its items,
    from the run's eval.json that holds exactly that result; as given when none does."""
    if result is None:
        return None
    for f in sorted(run_dir.glob("**/eval.json")):
        full = json.loads(f.read_text(encoding="utf-8"))
        if "items" in full and _slim(full) == result:
            return full
    return result


def heldout_change(before: dict | None, after: dict | None, recorded: dict | None, run_dir: Path) -> dict | None:
    """The change as tpo_lite.metrics.compare_heldout computes it today (with its split into format / answers)
    from the per-instruction items, with the run's bootstrap settings; it must reproduce the ``recorded`` change,
    else the items are not that run's. ``recorded`` as it is when either side lacks items."""
    from tpo_lite.metrics import compare_heldout, run_bootstrap_options

    if not (before and after and "items" in before and "items" in after):
        return recorded
    change = compare_heldout(before, after, **run_bootstrap_options(run_dir))
    if recorded is not None:
        differ = sorted(k for k in recorded if change.get(k) != recorded[k])
        if differ:
            raise SystemExit("readme_numbers: the held-out items do not reproduce the recorded change "
                             f"({', '.join(differ)})")
    return change


def stage_seconds(summary: dict) -> dict:
    """Seconds each stage took in this run's own records (iter_XX/metrics.json memory records), summed over the
    iterations; stages read back from an earlier process are not in them."""
    out: dict = {}
    for m in summary["iterations"]:
        for stage, rec in (m.get("memory") or {}).items():
            if isinstance(rec, dict) and "seconds" in rec:
                out[stage] = round(out.get(stage, 0.0) + rec["seconds"], 2)
    return out


def record(run_dir: Path, command: str, wall_seconds: float | None, load: str, timing_note: str = "",
           tree_memory: dict | None = None) -> dict:
    """``wall_seconds`` None: the run was not one uninterrupted process; ``timing_note`` says what is known.
    ``tree_memory``: what scripts/tree_memory.py measured around the command (the whole process tree)."""
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    for m in summary["iterations"]:  # the per-iteration memory records are in metrics.json, not summary.json
        f = run_dir / f"iter_{m['iteration']:02d}" / "metrics.json"
        if "memory" not in m and f.exists():
            m["memory"] = json.loads(f.read_text(encoding="utf-8")).get("memory")
    # the final score's environment: the seed's may come from an earlier process (reused by its settings hash)
    envs = [(summary.get(k) or {}).get("environment") for k in ("heldout_after", "heldout_before")]
    env = next((e for e in envs if e and e.get("tpo_lite_commit")), next((e for e in envs if e), None))
    # with the per-instruction scores, so the change (and any later analysis) re-derives from the record alone
    before, after = (_with_items(run_dir, summary.get(k)) for k in ("heldout_before", "heldout_after"))
    return {"command": command, "wall_seconds": wall_seconds, "timing_note": timing_note,
            "stage_seconds": stage_seconds(summary), "load": load,
            "commit": (env or {}).get("tpo_lite_commit"), "environment": env,
            "iterations": summary["iterations"],
            "heldout_before": before, "heldout_after": after,
            "heldout_change": heldout_change(before, after, summary.get("heldout_change"), run_dir),
            "memory": summary.get("memory"), "tree_memory": tree_memory}


def refresh(old: dict, run_dir: Path) -> dict:
    """``old`` (a record) made again from its run by today's :func:`record`, with what was given by hand (command,
    timing, load, tree memory) kept; every number ``old`` holds must come out the same (what is new, e.g. the
    per-instruction items or the change's split, is added)."""
    new = record(run_dir, old["command"], old.get("wall_seconds"), old["load"], old.get("timing_note", ""),
                 old.get("tree_memory"))
    differ = []
    for k, v in old.items():
        got = new.get(k)
        if k in ("heldout_before", "heldout_after"):
            got = _slim(got)
            v = _slim(v)
        elif k == "heldout_change" and isinstance(got, dict) and isinstance(v, dict):
            got = {kk: got.get(kk) for kk in v}
        if got != v:
            differ.append(k)
    if differ:
        raise SystemExit(f"readme_numbers refresh: {run_dir} is not the run of this record ({', '.join(differ)} differ)")
    return new


def _pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x, fmt=".3f"):
    return "-" if x is None else format(x, fmt)


def _ci(r, key="mean_score"):
    lo, hi = r[f"{key}_ci"]
    return f"{r[key]:.3f} [{lo:.3f}, {hi:.3f}]"


def render(rec: dict) -> str:
    """The Markdown tables of the README's 'Measured' section."""
    its = rec["iterations"]
    head = "| per iteration | " + " | ".join(str(m["iteration"]) for m in its) + " |"
    lines = [head, "|---|" + "---|" * len(its)]

    def row(label, get, fmt):
        vals = []
        for m in its:
            try:
                v = get(m)
            except (KeyError, TypeError):
                v = None
            vals.append(fmt(v))
        lines.append(f"| {label} | " + " | ".join(vals) + " |")

    row("training instructions x K", lambda m: f"{m['generate']['n_prompts']} x "
        f"{m['generate']['n_samples'] // max(1, m['generate']['n_prompts'])}", lambda v: v or "-")
    row("valid-format rate of the samples", lambda m: m["generate"]["valid_rate"], _pct)
    row("forced-marker rate", lambda m: m["generate"]["forced_rate"], _pct)
    row("cut-off rate", lambda m: m["generate"]["cut_off_rate"], _pct)
    row("thought length (chars, valid samples)", lambda m: m["generate"]["thought_chars_mean"],
        lambda v: _num(v, ".0f"))
    row("response length (chars, valid samples)", lambda m: m["generate"]["response_chars_mean"],
        lambda v: _num(v, ".0f"))
    row("mean judge score of the samples", lambda m: m["judge"]["mean_score"], _num)
    row("pairs kept", lambda m: m["pairs"]["pairs_kept"], lambda v: _num(v, ".0f"))
    row("of which the rejected side was cut off", lambda m: m["pairs"]["rejected_truncated"], lambda v: _num(v, ".0f"))
    if any("rejected_cut_to_chosen" in (m.get("pairs") or {}) for m in its):  # pairs.cut_off_rejected_length
        row("... and cut to the chosen's length", lambda m: m["pairs"]["rejected_cut_to_chosen"],
            lambda v: _num(v, ".0f"))
    row("DPO initial margin", lambda m: m["train"]["metrics"]["initial_margin"], lambda v: _num(v, ".4f"))
    row("DPO loss (last epoch)", lambda m: m["train"]["metrics"]["loss"], _num)
    lines.append("")
    b, a, d = rec["heldout_before"], rec["heldout_after"], rec["heldout_change"]
    lines += [f"| held-out ({b['n']} instructions, greedy) | mean score, 95% CI | valid format |", "|---|---|---|",
              f"| seed model | {_ci(b)} | {_pct(b['valid_rate'])} |",
              f"| after {len(its)} TPO iteration{'s' if len(its) != 1 else ''} | {_ci(a)} | {_pct(a['valid_rate'])} |"]
    lo, hi = d["score_diff_ci"]
    lines.append(f"| change (paired bootstrap) | {d['score_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | |")
    if d.get("format_change_ci"):  # tpo_lite.metrics.compare_heldout's split; the two add up to the change
        (flo, fhi), (vlo, vhi) = d["format_change_ci"], d["both_valid_change_ci"]
        lines += [f"| ... from outputs that became valid ({d['n_became_valid']}) or invalid ({d['n_became_invalid']}) "
                  f"| {d['format_change']:+.3f} [{flo:+.3f}, {fhi:+.3f}] | |",
                  f"| ... from outputs valid before and after ({d['n_both_valid']}) "
                  f"| {d['both_valid_change']:+.3f} [{vlo:+.3f}, {vhi:+.3f}] | |"]
    env = rec.get("environment") or {}
    cpu = env.get("cpu") or {}
    lines += ["", f"Measured on commit `{rec.get('commit')}`, {cpu.get('model', '?')} "
                  f"({', '.join(cpu.get('kernel_flags') or [])}), {env.get('threads')} thread{'' if env.get('threads') == 1 else 's'}, torch "
                  f"{env.get('torch')}, {env.get('dtype')} weights; machine load: {rec.get('load')}; "
                  + (f"wall time {rec['wall_seconds'] / 60:.1f} min for `{rec['command']}`."
                     if rec.get("wall_seconds") is not None else
                     f"command `{rec['command']}`; {rec.get('timing_note') or 'wall time not measured'}.")]
    mem, tree = rec.get("memory") or {}, rec.get("tree_memory")
    train = (mem.get("stage_peak_rss_mb") or {}).get("train")
    if train and mem.get("stage_processes"):
        peaks = mem["stage_peak_rss_mb"]
        top = max(peaks, key=peaks.get)
        lines.append(f"Memory: each stage in its own process; the largest, {top}, peaked at {peaks[top]:.0f} MB RSS "
                     f"(train, i.e. DPO: {train:.0f} MB); with the driver's {mem['driver_private_mb']:.0f} MB of its "
                     f"own the run held at most {mem['run_peak_total_mb']:.0f} MB = "
                     f"{mem['run_peak_total_mb'] / train:.2f} x the DPO stage"
                     + (f"; the process tree, sampled every {tree['interval_ms']:.0f} ms (sum of {tree['summed']}), "
                        f"peaked at {tree['peak_tree_mb']:.0f} MB = {tree['peak_tree_mb'] / train:.2f} x" if tree else "")
                     + ".")
    elif train and mem.get("run_peak_rss_mb"):
        lines.append(f"Memory: one process; it peaked at {mem['run_peak_rss_mb']:.0f} MB RSS = "
                     f"{mem['run_peak_rss_mb'] / train:.2f} x its largest train (DPO) stage ({train:.0f} MB).")
    if rec.get("stage_seconds"):
        lines.append("Stage times in this run's records: " + ", ".join(
            f"{k} {v / 60:.1f} min" for k, v in rec["stage_seconds"].items() if v >= 1) + ".")
    return "\n".join(lines)


def render_seeds(records: dict[int, dict]) -> str:
    """``{seed: record}`` of runs of one recipe -> the Markdown of :func:`tpo_lite.seeds.render_markdown` (each
    run's change with its CI; the mean change over runs with its Student-t interval), plus each run's commit, CPU
    and dtype."""
    from tpo_lite.seeds import DEFAULT_SEED_OPTIONS, render_markdown, summarize_seeds

    summary = summarize_seeds(records)
    def origin(rec: dict) -> str:  # greedy outputs of one commit differ between CPUs and dtypes (fingerprint.py)
        env = rec.get("environment") or {}
        cpu = (env.get("cpu") or {}).get("model") or "?"
        return f"`{(rec.get('commit') or '?')[:7]}` on {cpu}" + (f" ({env['dtype']})" if env.get("dtype") else "")

    runs = ", ".join(f"seed {s}: {origin(records[s])}" for s in sorted(records))
    return render_markdown(summary, DEFAULT_SEED_OPTIONS, heading=False) + f"\nMeasured at: {runs}.\n"


ARM_NAMES = {"tpo": "TPO (thoughts)", "direct": "direct (no thoughts)"}


def _paired_changes(run_dir: Path, iterations: list[int]) -> dict[int, dict | None]:
    """Each iteration's held-out change over the seed model, paired by instruction (the run's own final change is
    computed the same way, with the run's bootstrap settings); None where the per-instruction results are missing."""
    from tpo_lite.metrics import compare_heldout, run_bootstrap_options

    options = run_bootstrap_options(run_dir)

    def read(f: Path) -> dict | None:
        return json.loads(f.read_text(encoding="utf-8")) if f.exists() else None

    before = read(run_dir / "eval_base" / "eval.json")
    afters = {t: read(run_dir / f"iter_{t:02d}" / "heldout" / "eval.json") for t in iterations}
    return {t: compare_heldout(before, a, **options) if before and a else None for t, a in afters.items()}


def experiment_record(exp_dir: Path, command: str, wall_seconds: float | None, load: str, note: str = "",
                      tree_memory: dict | None = None) -> dict:
    """The record of a `tpo-lite experiment` directory: its experiment.json (Table 1) and, per run, the held-out
    score before, after every iteration and the paired change, with the machine and commit that scored them."""
    exp = json.loads((exp_dir / "experiment.json").read_text(encoding="utf-8"))
    arms = {}
    for label, sub in exp["runs"].items():
        arm = record(exp_dir / sub, command, wall_seconds, load)
        changes = _paired_changes(exp_dir / sub, [m["iteration"] for m in arm["iterations"]])
        arms[label] = {"commit": arm["commit"], "environment": arm["environment"],
                       "heldout_before": _slim(arm["heldout_before"]), "heldout_after": _slim(arm["heldout_after"]),
                       "heldout_change": arm["heldout_change"], "stage_seconds": arm["stage_seconds"],
                       "per_iteration": [{"iteration": m["iteration"], **(m.get("heldout") or {}),
                                          "change": changes[m["iteration"]]}
                                         for m in arm["iterations"]]}
    return {"command": command, "wall_seconds": wall_seconds, "load": load, "note": note,
            "tree_memory": tree_memory, "experiment": exp, "arms": arms}


def render_experiment(rec: dict) -> str:
    """The README's tables of the direct-response experiment: Table 1 and the held-out score per iteration."""
    exp, arms = rec["experiment"], rec["arms"]

    def pct(v, ci):
        return "-" if v is None else f"{100 * v:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"

    lines = ["| comparison | win rate [CI] | LC win rate [CI] | W / T / L | invalid format |", "|---|---|---|---|---|"]
    for r in exp["table"]:
        lines.append(f"| {r['comparison']} | {pct(r['win_rate'], r['win_rate_ci'])} | "
                     f"{pct(r['lc_win_rate'], r['lc_win_rate_ci'])} | {r['wins']} / {r['ties']} / {r['losses']} | "
                     f"{_pct(r['invalid_rate'])} |")
    n_iter = max(len(a["per_iteration"]) for a in arms.values())
    n = next(iter(arms.values()))["heldout_before"]["n"]
    lines += ["", f"| held-out score ({n} instructions, greedy) | seed | "
              + " | ".join(f"iter {t}" for t in range(1, n_iter + 1)) + " | change [95% CI] | valid format |",
              "|---|---|" + "---|" * n_iter + "---|---|"]
    for label, arm in arms.items():
        its = [_num(m.get("mean_score")) for m in arm["per_iteration"]]
        d = arm["heldout_change"]
        lo, hi = d["score_diff_ci"]
        lines.append(f"| {ARM_NAMES.get(label, label)} | {arm['heldout_before']['mean_score']:.3f} | "
                     + " | ".join(its) + f" | {d['score_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}] | "
                     f"{_pct(d['valid_rate_before'])} → {_pct(d['valid_rate_after'])} |")
    env = next(iter(arms.values()))["environment"] or {}
    cpu = env.get("cpu") or {}
    commits = ", ".join(f"{label} `{arm['commit']}`" for label, arm in arms.items())
    lines += ["", f"Final scores by commit ({commits}) on {cpu.get('model', '?')} "
                  f"({', '.join(cpu.get('kernel_flags') or [])}), {env.get('threads')} threads, torch "
                  f"{env.get('torch')}, {env.get('dtype')} weights; machine load: {rec['load']}; "
              + (f"wall time {rec['wall_seconds'] / 60:.1f} min for `{rec['command']}`"
                 if rec.get("wall_seconds") is not None else f"command `{rec['command']}`")
              + (f"; {rec['note']}" if rec.get("note") else "") + "."]
    for label, arm in arms.items():
        if arm.get("stage_seconds"):
            lines.append(f"Stage times in the {label} run's records: " + ", ".join(
                f"{k} {v / 60:.1f} min" for k, v in arm["stage_seconds"].items() if v >= 1) + ".")
    return "\n".join(lines)


def _seed_record(arg: str) -> tuple[int, dict]:
    seed, sep, path = arg.partition("=")
    if not sep or not seed.strip().lstrip("-").isdigit():
        raise SystemExit(f"readme_numbers seeds: {arg!r} is not SEED=RECORD.json")
    return int(seed), json.loads(Path(path).read_text(encoding="utf-8"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("record", help="write the record of a measured run")
    r.add_argument("run_dir", type=Path)
    r.add_argument("--command", required=True)
    r.add_argument("--wall-seconds", type=float, default=None,
                   help="wall time of the command as one uninterrupted process (omit if it was not)")
    r.add_argument("--timing-note", default="", help="what is known of the timing when --wall-seconds is omitted")
    r.add_argument("--load", required=True, help="what else ran on the machine")
    r.add_argument("--tree-memory", type=Path, default=None,
                   help="the --json of scripts/tree_memory.py run around the command")
    r.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("refresh", help="make a record again from its run with this script (numbers must match; "
                                       "what this script adds since, e.g. per-instruction items, is added)")
    f.add_argument("record", type=Path)
    f.add_argument("run_dir", type=Path)
    p = sub.add_parser("render", help="print the README tables of a record")
    p.add_argument("record", type=Path)
    sd = sub.add_parser("seeds", help="summarise records of one recipe run with different seeds")
    sd.add_argument("records", nargs="+", metavar="SEED=RECORD.json")
    sd.add_argument("--plot", type=Path, default=None,
                    help="also draw the forest plot of `tpo-lite seeds` (seeds.png) of these records to this file")
    e = sub.add_parser("experiment", help="write the record of a measured `tpo-lite experiment` directory")
    e.add_argument("exp_dir", type=Path)
    e.add_argument("--command", required=True)
    e.add_argument("--wall-seconds", type=float, default=None)
    e.add_argument("--load", required=True, help="what else ran on the machine")
    e.add_argument("--note", default="", help="how the runs came to be, e.g. a run resumed from an earlier one")
    e.add_argument("--tree-memory", type=Path, default=None)
    e.add_argument("--out", type=Path, required=True)
    re_ = sub.add_parser("render-experiment", help="print the README tables of an experiment record")
    re_.add_argument("record", type=Path)
    args = ap.parse_args(argv)
    if args.cmd in ("record", "experiment"):
        tree = json.loads(args.tree_memory.read_text(encoding="utf-8")) if args.tree_memory else None
        if args.cmd == "record":
            rec = record(args.run_dir, args.command, args.wall_seconds, args.load, args.timing_note, tree)
        else:
            rec = experiment_record(args.exp_dir, args.command, args.wall_seconds, args.load, args.note, tree)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}", file=sys.stderr)
    elif args.cmd == "refresh":
        rec = refresh(json.loads(args.record.read_text(encoding="utf-8")), args.run_dir)
        args.record.write_text(json.dumps(rec, indent=1) + "\n", encoding="utf-8")
        print(f"refreshed {args.record} from {args.run_dir}", file=sys.stderr)
    elif args.cmd == "seeds":
        records = dict(_seed_record(a) for a in args.records)
        print(render_seeds(records), end="")
        if args.plot:
            from tpo_lite.seeds import plot_seeds, summarize_seeds

            plot_seeds(summarize_seeds(records), args.plot)
            print(f"wrote {args.plot}", file=sys.stderr)
    else:
        rec = json.loads(args.record.read_text(encoding="utf-8"))
        print(render(rec) if args.cmd == "render" else render_experiment(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
