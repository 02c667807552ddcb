"""`tpo-lite bench ...`: benchmarks. `bench kernels` times the fused log-prob kernels (tpo_lite.bench.kernels),
`bench sampling` the local sampler (tpo_lite.bench.sampling)."""
import dataclasses
import functools
import importlib

import click

from tpo_lite.bench.kernels import METHODS


def _field_help(module: str, cls: str, name: str) -> str:
    # The option's documentation lives once, in the config field's metadata. The bench modules import neither
    # torch nor transformers at module level: --help stays fast.
    config = getattr(importlib.import_module(f"tpo_lite.bench.{module}"), cls)
    return {f.name: f.metadata["help"] for f in dataclasses.fields(config)}[name]


_help = functools.partial(_field_help, "kernels", "KernelBenchConfig")
_train_help = functools.partial(_field_help, "train", "TrainBenchConfig")
_sampling_help = functools.partial(_field_help, "sampling", "SamplingBenchConfig")


def _split(value):
    return [x for item in value for x in item.split(",") if x]


def _config(cls, methods, **kwargs):
    """``cls(**kwargs)`` with the --methods given (repeatable or comma-separated); a bad value is a usage error."""
    try:
        return cls(**kwargs, **({"methods": _split(methods)} if methods else {}))
    except ValueError as e:
        raise click.UsageError(str(e))


def _report(result: dict, format_table, out) -> None:
    """Print the benchmark's table; write everything as JSON to ``out`` when given."""
    from tpo_lite.jsonl import write_json_atomic

    click.echo(format_table(result))
    if out:
        write_json_atomic(out, result)
        click.echo(f"wrote {out}", err=True)


@click.group("bench")
def bench_command():
    """Benchmarks of tpo-lite: the fused kernels, local sampling, DPO training."""


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
    from tpo_lite.bench.kernels import KernelBenchConfig, format_table, parse_shapes, run_kernel_benchmark

    try:
        kwargs = dict(device=device, repeats=repeats, warmup=warmup, memory=memory, threads=threads, seed=seed)
        if shapes:
            kwargs["shapes"] = parse_shapes(shapes)
        if dtypes:
            kwargs["dtypes"] = _split(dtypes)
        cfg = _config(KernelBenchConfig, methods, **kwargs)
        result = run_kernel_benchmark(cfg, log=lambda line: click.echo(line, err=True))  # "cuda requested": usage
    except ValueError as e:
        raise click.UsageError(str(e))
    _report(result, format_table, out)


@bench_command.command("train")
@click.option("--model", default="smollm2", show_default=True, help=_train_help("model"))
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help=_train_help("dtype"))
@click.option("--load-in-4bit", type=click.Choice(["auto", "true", "false"]), default="auto", show_default=True,
              help=_train_help("load_in_4bit"))
@click.option("--device", default="auto", show_default=True, help=_train_help("device"))
@click.option("--pairs", type=click.Path(exists=True, dir_okay=False), default=None, help=_train_help("pairs"))
@click.option("--n-pairs", type=int, default=16, show_default=True, help=_train_help("n_pairs"))
@click.option("--max-length", type=int, default=512, show_default=True, help=_train_help("max_length"))
@click.option("--batch-size", type=int, default=2, show_default=True, help=_train_help("batch_size"))
@click.option("--grad-accum", type=int, default=1, show_default=True, help=_train_help("grad_accum"))
@click.option("--lora-r", type=int, default=16, show_default=True, help=_train_help("lora_r"))
@click.option("--methods", "methods", multiple=True, metavar="M", help=_train_help("methods") + " Repeatable or "
              "comma-separated. [default: tpo-lite,trl]")
@click.option("--repeats", type=int, default=3, show_default=True, help=_train_help("repeats"))
@click.option("--threads", type=int, default=0, show_default=True, help=_train_help("threads"))
@click.option("--seed", type=int, default=0, show_default=True, help=_train_help("seed"))
@click.option("--trl-python", default="", help=_train_help("trl_python"))
@click.option("--timeout", "timeout_s", type=float, default=3600.0, show_default=True, help=_train_help("timeout_s"))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
def train_command(model, dtype, load_in_4bit, device, pairs, n_pairs, max_length, batch_size, grad_accum, lora_r,
                  methods, repeats, threads, seed, trl_python, timeout_s, out):
    """DPO training: tpo-lite vs TRL's DPOTrainer on the same pairs (tokens/s and peak RSS).

    Each run (load, reference log-probs, one epoch of LoRA DPO) is a fresh subprocess; runs are interleaved
    and the medians and ratios reported. Prints a table; --out also writes everything as JSON, rewritten after
    every run (with "complete": false until the last), so a benchmark cut short keeps the runs it finished.
    """
    from tpo_lite.bench.train import TrainBenchConfig, format_table, run_train_benchmark
    from tpo_lite.jsonl import write_json_atomic

    cfg = _config(TrainBenchConfig, methods, model=model, dtype=dtype, load_in_4bit=load_in_4bit, device=device,
                  pairs=pairs or "", n_pairs=n_pairs, max_length=max_length, batch_size=batch_size,
                  grad_accum=grad_accum, lora_r=lora_r, repeats=repeats, threads=threads, seed=seed,
                  trl_python=trl_python, timeout_s=timeout_s)
    result = run_train_benchmark(cfg, log=lambda line: click.echo(line, err=True),
                                 on_run=(lambda partial: write_json_atomic(out, partial)) if out else None)
    _report(result, format_table, out)
    failed = [m for m, v in result["methods"].items() if v["status"].startswith("failed")]
    if failed:
        raise click.ClickException(f"failed: {', '.join(failed)} (see the JSON / messages above)")


@bench_command.command("sampling")
@click.option("--model", default="smollm2", show_default=True, help=_sampling_help("model"))
@click.option("--adapter", type=click.Path(exists=True, file_okay=False), default=None,
              help=_sampling_help("adapter"))
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help=_sampling_help("dtype"))
@click.option("--device", default="auto", show_default=True, help=_sampling_help("device"))
@click.option("--instructions", default="train", show_default=True, help=_sampling_help("instructions"))
@click.option("--prompts", type=int, default=24, show_default=True, help=_sampling_help("prompts"))
@click.option("--template", default="generic", show_default=True, help=_sampling_help("template"))
@click.option("--prefill-thought-header/--no-prefill-thought-header", default=True, show_default=True,
              help=_sampling_help("prefill_thought_header"))
@click.option("--k", "k", type=int, default=4, show_default=True, help=_sampling_help("k"))
@click.option("--temperature", type=float, default=0.8, show_default=True, help=_sampling_help("temperature"))
@click.option("--top-p", type=float, default=0.95, show_default=True, help=_sampling_help("top_p"))
@click.option("--max-new-tokens", type=int, default=224, show_default=True, help=_sampling_help("max_new_tokens"))
@click.option("--thought-budget", type=int, default=96, show_default=True, help=_sampling_help("thought_budget"))
@click.option("--batch-size", type=int, default=96, show_default=True, help=_sampling_help("batch_size"))
@click.option("--reference-batch-size", type=int, default=8, show_default=True,
              help=_sampling_help("reference_batch_size"))
@click.option("--methods", "methods", multiple=True, metavar="M", help=_sampling_help("methods") + " Repeatable or "
              "comma-separated. [default: sampler,reference,generate]")
@click.option("--repeats", type=int, default=3, show_default=True, help=_sampling_help("repeats"))
@click.option("--warmup/--no-warmup", default=True, show_default=True, help=_sampling_help("warmup"))
@click.option("--threads", type=int, default=0, show_default=True, help=_sampling_help("threads"))
@click.option("--seed", type=int, default=0, show_default=True, help=_sampling_help("seed"))
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="Write the results as JSON here.")
def sampling_command(out, methods, **kwargs):
    """Local sampling throughput: the sampler vs its pre-speed-up reference path vs model.generate.

    The same work (prompts x K samples, temperature, top-p, token limit, budget forcing for the sampler
    methods) timed interleaved; prints median tokens/s (wall and per CPU-second) and their ratios; --out also
    writes every run as JSON. Defaults: the embedded SmolLM2 on 24 training instructions, K=4, 224 tokens, as
    examples/smollm2_cpu.toml samples them.
    """
    from tpo_lite.bench.sampling import SamplingBenchConfig, format_table, run_sampling_benchmark

    cfg = _config(SamplingBenchConfig, methods, **kwargs)
    result = run_sampling_benchmark(cfg, log=lambda line: click.echo(line, err=True))
    _report(result, format_table, out)
