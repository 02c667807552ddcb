"""tpo_lite.fingerprint: what a measured number depends on besides the code."""
import copy

from tpo_lite.fingerprint import comparable, environment, model_environment
from tpo_lite.models import ModelConfig


def test_environment_records_what_changes_greedy_tokens():
    env = model_environment(ModelConfig(path="smollm2", device="cpu", dtype="float32"))
    assert env["device"] == "cpu" and env["dtype"] == "float32"
    for key in ("torch", "transformers", "torch_cpu_capability", "threads"):
        assert env[key] not in (None, "")
    assert isinstance(env["cpu"]["kernel_flags"], list)


def test_comparable_only_when_kernels_dtype_and_versions_match():
    a = environment(device="cpu", dtype="bfloat16")
    assert comparable(a, copy.deepcopy(a))
    for change in ({"dtype": "float32"}, {"torch": "0.0"}, {"torch_cpu_capability": "DEFAULT"}):
        assert not comparable(a, {**a, **change})
    b = copy.deepcopy(a)
    b["cpu"]["kernel_flags"] = [f for f in b["cpu"]["kernel_flags"] if f != "avx512_bf16"] + ["x"]
    assert not comparable(a, b)
    assert not comparable(a, None)
