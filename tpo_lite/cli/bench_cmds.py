"""`tpo-lite bench ...`: benchmarks. `bench kernels` times the fused log-prob kernels (tpo_lite.bench.kernels)."""
import dataclasses

import click

from tpo_lite.bench.kernels import METHODS, KernelBenchConfig


def _help(name: str) -> str:
    # The option's documentation lives once, in the config field's metadata.
    return {f.name: f.metadata["help"] for f in dataclasses.fields(KernelBenchConfig)}[name]


def _split(value):
    return [x for item in value for x in item.split(",") if x]


@click.group("bench")
def bench_command():
    """Benchmarks of tpo-lite's kernels."""


@bench_command.command("kernels")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help=_help("device"))
@click.option("--shapes", "shapes", default=None, metavar="N,d,V[;N,d,V...]", help=_help("shapes"))
@click.option("--dtype", "dtypes", multiple=True, metavar="DTYPE", help=_help("dtypes") + " Repeatable or "
              "comma-separated. [default: float32,bfloat16]")
@click.option("--methods", "methods", multiple=True, metavar="M", help=_help("methods") + " Repeatable or "
              f"comma-separated. [default: {','.join(METHODS)}]")
@click.option("--repeats", type=int, default=5, show_default=True, help=_help("repeats"))
@click.option("--warmup", type=int, default=1, show_default=True, help=_help("warmup"))
@click.option("--memory/--no-memory", default=True, show_default=True, help=_help("memory"))
@click.option("--threads", type=int, default=0, show_default=True, help=_help("threads"))
@click.option("--seed", type=int, default=0, show_default=True, help=_help("seed"))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
def kernels_command(device, shapes, dtypes, methods, repeats, warmup, memory, threads, seed, out):
    """Fused linear log-probs vs eager PyTorch, torch.compile, Liger-Kernel and the matrix-product floor.

    Each case times one frozen-head training step (log-probs of N tokens, sum, backward to the hidden
    states): medians of interleaved runs, peak extra memory, and the ratios fused/eager and fused/floor.
    Prints a table; --out also writes everything as JSON.
    """
    from tpo_lite.bench.kernels import format_table, parse_shapes, run_kernel_benchmark, write_json

    try:
        kwargs = dict(device=device, repeats=repeats, warmup=warmup, memory=memory, threads=threads, seed=seed)
        if shapes:
            kwargs["shapes"] = parse_shapes(shapes)
        if dtypes:
            kwargs["dtypes"] = _split(dtypes)
        if methods:
            kwargs["methods"] = _split(methods)
        cfg = KernelBenchConfig(**kwargs)
        result = run_kernel_benchmark(cfg, log=lambda line: click.echo(line, err=True))
    except ValueError as e:
        raise click.UsageError(str(e))
    click.echo(format_table(result))
    if out:
        write_json(result, out)
        click.echo(f"wrote {out}", err=True)
