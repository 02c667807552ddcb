"""The kernel benchmark on tiny shapes: JSON structure, medians and ratios computed from the measured times."""
import json
import math
import statistics

import pytest
import torch
from click.testing import CliRunner

from tpo_lite.bench import kernels
from tpo_lite.bench.kernels import (
    KernelBenchConfig,
    build_step,
    eager_logprobs,
    format_table,
    make_inputs,
    parse_shapes,
    run_kernel_benchmark,
)
from tpo_lite.cli.bench_cmds import bench_command
from tpo_lite.ops import linear_logprobs_reference

TINY = [(16, 8, 300)]


def _check_result(result, cfg):
    assert set(result) == {"meta", "cases"}
    meta = result["meta"]
    assert meta["device"] == "cpu" and meta["repeats"] == cfg.repeats
    assert isinstance(meta["fused_impl"], str) and meta["fused_impl"]
    assert len(result["cases"]) == len(cfg.shapes) * len(cfg.dtypes)
    for case in result["cases"]:
        assert (case["N"], case["d"], case["V"]) in cfg.shapes and case["dtype"] in cfg.dtypes
        assert set(case["methods"]) == set(cfg.methods)
        ok = {m: v for m, v in case["methods"].items() if v["status"] == "ok"}
        assert {"fused", "eager", "floor"} <= set(ok)
        for m, v in ok.items():
            assert len(v["times_ms"]) == cfg.repeats
            assert all(t > 0 and math.isfinite(t) for t in v["times_ms"])
            assert v["median_ms"] == statistics.median(v["times_ms"])
        # Every ratio is a positive finite quotient of the measured medians / peaks.
        assert "fused/eager" in case["ratios"] and "fused/floor" in case["ratios"]
        for key, value in case["ratios"].items():
            assert isinstance(value, float) and value > 0 and math.isfinite(value), (key, value)
            if key.startswith("mem "):
                a, b = key[4:].split("/")
                expected = ok[a]["peak_extra_bytes"] / ok[b]["peak_extra_bytes"]
            else:
                a, b = key.split("/")
                expected = ok[a]["median_ms"] / ok[b]["median_ms"]
            assert value == pytest.approx(expected, rel=1e-12)
        for m in set(ok) & set(k.split("/")[1] for k in case["ratios"] if not k.startswith("mem")):
            assert f"fused/{m}" in case["ratios"]
        assert case["max_abs_diff_fused_vs_eager"] is not None
        assert case["max_abs_diff_fused_vs_eager"] < (1e-4 if case["dtype"] == "float32" else 5e-2)


def test_benchmark_tiny_with_memory():
    cfg = KernelBenchConfig(device="cpu", shapes=TINY, dtypes=["float32"], methods=["fused", "eager", "floor", "liger"],
                            repeats=5, warmup=1, memory=True, threads=1)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result = run_kernel_benchmark(cfg, log=lambda line: None)
        # the benchmark ran with its own thread count and gave the caller's back (a leaked count made a later run
        # in this process differ in its last bits from the same run in a fresh process)
        assert result["meta"]["threads"] == 1 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    _check_result(result, cfg)
    case = result["cases"][0]
    # Liger-Kernel needs a GPU: reported, not silently dropped.
    assert case["methods"]["liger"]["status"].startswith("n/a (")
    assert "fused/liger" not in case["ratios"]
    assert "clear_refs" in result["meta"]["memory_method"] or "ru_maxrss" in result["meta"]["memory_method"]
    for m in ("fused", "eager", "floor"):
        v = case["methods"][m]
        assert "memory_error" not in v and isinstance(v["peak_extra_bytes"], int) and v["peak_extra_bytes"] >= 0, v
    # Eager holds [N, V] logits and their gradient; at this tiny size both peaks are heap noise, so only a
    # gross inversion (fused over 1 MiB above eager) would point at a measurement bug.
    assert case["methods"]["eager"]["peak_extra_bytes"] >= case["methods"]["fused"]["peak_extra_bytes"] - 2**20
    table = format_table(result)
    assert "fused/eager" in table and "liger: n/a (" in table


def test_memory_measurement_sees_the_logits():
    # N x V = 256 x 65536 fp32 logits are 64 MiB; eager materialises them (and their softmax / gradient), the
    # floor holds them once, the fused op only a vocab chunk. The subprocess measurement must see that order.
    n, d, v = 256, 64, 65536
    cfg = KernelBenchConfig(device="cpu", shapes=[(n, d, v)], dtypes=["float32"], methods=["fused", "eager", "floor"],
                            repeats=1, warmup=0, memory=True, threads=1)
    ms = run_kernel_benchmark(cfg, log=lambda line: None)["cases"][0]["methods"]
    logits = n * v * 4
    # 0.9: pages the process already had resident (heap, allocator caches) are reused without raising VmHWM.
    assert ms["eager"]["peak_extra_bytes"] >= 0.9 * 2 * logits
    assert ms["floor"]["peak_extra_bytes"] >= 0.9 * logits
    assert ms["fused"]["peak_extra_bytes"] < logits / 4


def test_cli_writes_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench_command, [
        "kernels", "--device", "cpu", "--shapes", "16,8,300;3,5,70", "--dtype", "float32,bfloat16",
        "--methods", "fused,eager", "--methods", "floor", "--repeats", "5", "--no-memory", "--threads", "1",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    cfg = KernelBenchConfig(device="cpu", shapes=[(16, 8, 300), (3, 5, 70)], dtypes=["float32", "bfloat16"],
                            methods=["fused", "eager", "floor"], repeats=5, memory=False)
    _check_result(result, cfg)
    assert result["meta"]["memory_method"] is None
    assert all("peak_extra_bytes" not in v for c in result["cases"] for v in c["methods"].values())
    assert "fused ms" in res.output and "fused/floor" in res.output


@pytest.mark.parametrize("args, message", [
    (["--shapes", "16,8"], "three"),
    (["--shapes", "16,8,-3"], "positive"),
    (["--dtype", "int8"], "unknown dtype"),
    (["--methods", "eager"], "must include fused"),
    (["--methods", "fused,magic"], "unknown method"),
    (["--repeats", "0"], "repeats"),
])
def test_cli_rejects_bad_options(args, message):
    res = CliRunner().invoke(bench_command, ["kernels", "--device", "cpu", "--no-memory", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output


def test_parse_shapes():
    assert parse_shapes("2048,896,151936; 1024x576x49152") == [(2048, 896, 151936), (1024, 576, 49152)]


def test_eager_and_floor_steps_compute_what_they_claim(monkeypatch):
    hidden, weight, targets = make_inputs(7, 5, 50, torch.float64, "cpu", seed=3)
    ref = linear_logprobs_reference(hidden.detach(), weight, targets)
    assert torch.allclose(eager_logprobs(hidden.detach(), weight, targets).double(), ref, atol=1e-6)
    # The eager step's gradient is d(sum logp)/dh = W_t - softmax @ W, per row.
    build_step("eager", hidden, weight, targets, KernelBenchConfig())()
    p = torch.softmax(hidden.detach() @ weight.t(), dim=-1)
    assert torch.allclose(hidden.grad.double(), (weight[targets] - p @ weight), atol=1e-5)
    # The floor is (h W^T) W; chunked over the vocab (V=50 in chunks of 16) it gives the same product.
    expected = (hidden.detach() @ weight.t()) @ weight
    assert torch.allclose(build_step("floor", hidden, weight, targets, KernelBenchConfig())(), expected)
    monkeypatch.setattr(kernels, "FLOOR_CHUNK", 16)
    assert kernels._floor_chunk(7, 50, 8, max_bytes=1) == 16
    chunked = build_step("floor", hidden, weight, targets, KernelBenchConfig(floor_max_bytes=1))()
    assert torch.allclose(chunked, expected)


@pytest.mark.slow
def test_benchmark_tiny_with_compile():
    cfg = KernelBenchConfig(device="cpu", shapes=[(8, 16, 64)], dtypes=["float32"],
                            methods=["fused", "eager", "compiled", "floor"], repeats=5, memory=False, threads=1)
    result = run_kernel_benchmark(cfg, log=lambda line: None)
    case = result["cases"][0]
    status = case["methods"]["compiled"]["status"]
    assert status == "ok" or status.startswith("n/a ("), status
    if status == "ok":
        assert case["ratios"]["fused/compiled"] == pytest.approx(
            case["methods"]["fused"]["median_ms"] / case["methods"]["compiled"]["median_ms"])


@pytest.mark.slow
def test_cmake_standalone_build_and_cpp_benchmark(tmp_path):
    """CMakeLists.txt configures, builds the CPU kernels + C++ benchmark, and the benchmark runs (CUDA off here;
    tests/test_cuda_compile.py covers the .cu sources)."""
    import os
    import shutil
    import subprocess

    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("cmake not found")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    cfg = subprocess.run([cmake, "-S", repo, "-B", str(build), *gen, "-DTPO_LITE_ENABLE_CUDA=OFF",
                          f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                         capture_output=True, text=True, timeout=300)
    assert cfg.returncode == 0, cfg.stdout[-3000:] + cfg.stderr[-3000:]
    bld = subprocess.run([cmake, "--build", str(build), "--target", "tpo_lite_bench"], capture_output=True,
                         text=True, timeout=900)
    assert bld.returncode == 0, (bld.stdout + bld.stderr)[-5000:]
    run = subprocess.run([str(build / "tpo_lite_bench"), "--N", "16", "--d", "8", "--V", "300", "--repeats", "3",
                          "--chunk", "64"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("device=cpu dtype=float32 N=16 d=8 V=300")
    medians = {ln.split()[0]: float(ln.split()[2]) for ln in lines if " median " in ln}
    assert set(medians) == {"fused", "eager", "floor"} and all(v > 0 for v in medians.values())
    ratios = lines[-1].split()
    assert float(ratios[1]) == pytest.approx(medians["fused"] / medians["eager"], rel=1e-2, abs=2e-3)
    assert float(ratios[-1]) < 1e-4  # max |fused - eager| log-prob in fp32
    bad = subprocess.run([str(build / "tpo_lite_bench"), "--N", "x"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--N needs an integer" in bad.stderr


# ------------------------------------------------------------------------------------------ bench sampling

def test_sampling_bench_cli_on_a_tiny_model(tmp_path):
    from peft import LoraConfig, get_peft_model
    from test_loop import build_tiny_model, write_instructions
    from transformers import AutoModelForCausalLM

    model_dir = build_tiny_model(tmp_path / "model")
    inst = write_instructions(tmp_path / "inst.jsonl", 3, "b")
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), lora).save_pretrained(tmp_path / "adapter")
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(bench_command, [
        "sampling", "--model", str(model_dir), "--adapter", str(tmp_path / "adapter"), "--instructions", str(inst),
        "--prompts", "3", "--k", "2", "--max-new-tokens", "12", "--thought-budget", "6", "--batch-size", "4",
        "--reference-batch-size", "2", "--repeats", "2", "--threads", "1", "--dtype", "float32", "--device", "cpu",
        "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert set(result["methods"]) == {"sampler", "reference", "generate"}
    assert result["meta"]["prompts"] == 3 and result["meta"]["adapter"] == str(tmp_path / "adapter")
    for name, m in result["methods"].items():
        assert len(m["runs"]) == 2
        for run in m["runs"]:
            assert 0 < run["tokens"] <= 3 * 2 * 12 and sum(run["finish"].values()) == 6
            assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["wall_s"])
        assert m["median_tokens_per_s"] == statistics.median(r["tokens_per_s"] for r in m["runs"])
        assert m["reproducible"] is (None if name == "generate" else True)
    assert result["methods"]["reference"]["batch_size"] == 2 and result["methods"]["sampler"]["batch_size"] == 4
    ms = result["methods"]
    for key, value in result["ratios"].items():
        cpu = key.startswith("cpu ")
        a, b = key[4 if cpu else 0:].split("/")
        field = "median_tokens_per_cpu_s" if cpu else "median_tokens_per_s"
        assert value == pytest.approx(ms[a][field] / ms[b][field])
    assert {"sampler/reference", "sampler/generate", "cpu sampler/reference"} <= set(result["ratios"])
    # Same seeds and settings: the sped-up sampler and its reference path draw the same token counts here.
    assert ms["sampler"]["runs"][0]["tokens"] == ms["reference"]["runs"][0]["tokens"]
    assert "sampler/reference" in res.output and "tok/s" in res.output


@pytest.mark.parametrize("args, message", [
    (["--methods", "sampler,magic"], "unknown method"),
    (["--k", "0"], "k: must be >= 1"),
    (["--repeats", "0"], "repeats"),
])
def test_sampling_bench_rejects_bad_options(args, message):
    res = CliRunner().invoke(bench_command, ["sampling", *args])
    assert res.exit_code == 2, res.output
    assert message in res.output
