"""The in-process vLLM backend (tpo_lite.vllm_backend) against a fake ``vllm`` package.

vllm is not installed here (and needs a GPU), so the tests put a small fake ``vllm`` into ``sys.modules``. It
implements only what the backend calls -- ``LLM(...)``, ``LLM.generate``, ``SamplingParams``, ``TokensPrompt``,
``LoRARequest``, the outputs and ``llm_engine.engine_core.shutdown`` -- with the signatures of vLLM's source
(vllm/entrypoints/llm.py, vllm/sampling_params.py, vllm/lora/request.py, vllm/outputs.py) and vLLM's stop
rules: EOS and ``stop_token_ids`` end a request with finish_reason "stop" (stop_reason None / the token id),
``max_tokens`` with "length", a stop string with "stop" and the string as stop_reason (kept in the text with
``include_stop_str_in_output``), the stop tokens stay in ``token_ids``. Its tokens come from a tiny random llama
loaded from the model directory (greedy, or sampled with a generator seeded by ``SamplingParams.seed``), or
from a script keyed by the request's seed. Like a GPU, it holds one engine at a time: building a second one
while another is not shut down fails. The last test runs the real vllm when it and a GPU are present.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import random
import subprocess
import sys
import types
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, TypedDict, Union

import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.prompts import get_template
from tpo_lite.sampling import LocalSampler, Sample, SamplingConfig, make_job, make_sampler

REPO = Path(__file__).resolve().parents[1]
CORPUS = [
    "Here is my thought process: think about the question carefully.",
    "Here is my response: the answer is short and clear.",
    "The quick brown fox jumps over the lazy dog. STOP now.",
    "Respond to the following user query in a comprehensive and detailed way.",
]


# ------------------------------------------------------------------------------------------ the fake vllm

# EngineArgs fields the backend may pass through LLM(**kwargs) (vllm/engine/arg_utils.py).
ENGINE_ARGS = {"enable_lora", "max_lora_rank", "max_loras", "max_model_len"}


class FakeState:
    """What the fake engines did, for the assertions."""

    def __init__(self, policy):
        self.policy = policy  # (engine, prompt_ids, params, lora_request) -> iterator of token ids
        self.engines: list = []  # weakrefs to every LLM built
        self.calls: list = []  # (prompt ids, SamplingParams, LoRARequest) per request
        self.events: list = []  # ("build", kwargs) / ("shutdown", model)

    def live(self) -> list:
        return [e for e in (r() for r in self.engines) if e is not None and e.llm_engine.engine_core.alive]


def build_fake_vllm(state: FakeState) -> dict:
    """Modules ``vllm``, ``vllm.inputs``, ``vllm.lora``, ``vllm.lora.request``, ``vllm.outputs``."""

    @dataclass(kw_only=True)
    class SamplingParams:  # the fields (and defaults) of vllm/sampling_params.py that matter here
        n: int = 1
        presence_penalty: float = 0.0
        frequency_penalty: float = 0.0
        repetition_penalty: float = 1.0
        temperature: float = 1.0
        top_p: float = 1.0
        top_k: int = 0
        min_p: float = 0.0
        seed: Optional[int] = None
        stop: Optional[Union[str, list[str]]] = None
        stop_token_ids: Optional[list[int]] = None
        ignore_eos: bool = False
        max_tokens: Optional[int] = 16
        min_tokens: int = 0
        logprobs: Optional[int] = None
        prompt_logprobs: Optional[int] = None
        detokenize: bool = True
        skip_special_tokens: bool = True
        spaces_between_special_tokens: bool = True
        include_stop_str_in_output: bool = False

        def __post_init__(self):
            if not 0.0 < self.top_p <= 1.0:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
            if self.max_tokens is not None and self.max_tokens < 1:
                raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}.")

    class TokensPrompt(TypedDict):
        prompt_token_ids: list[int]

    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""
        long_lora_max_len: Optional[int] = None
        base_model_name: Optional[str] = None

        def __post_init__(self):
            if self.lora_int_id < 1:
                raise ValueError(f"id must be > 0, got {self.lora_int_id}")

    @dataclass
    class CompletionOutput:
        index: int
        text: str
        token_ids: list[int]
        cumulative_logprob: Optional[float]
        logprobs: Any
        finish_reason: Optional[str] = None
        stop_reason: Union[int, str, None] = None
        lora_request: Optional[LoRARequest] = None

    @dataclass
    class RequestOutput:
        request_id: str
        prompt: Optional[str]
        prompt_token_ids: Optional[list[int]]
        prompt_logprobs: Any
        outputs: list
        finished: bool
        lora_request: Optional[LoRARequest] = None

    class EngineCoreClient:
        def __init__(self):
            self.alive = True

        def shutdown(self):
            self.alive = False
            state.events.append(("shutdown",))

    class LLMEngine:
        def __init__(self):
            self.engine_core = EngineCoreClient()

    class LLM:
        def __init__(self, model: str, *, task="auto", tokenizer: Optional[str] = None, tokenizer_mode="auto",
                     skip_tokenizer_init: bool = False, trust_remote_code: bool = False,
                     allowed_local_media_path: str = "", tensor_parallel_size: int = 1, dtype="auto",
                     quantization=None, revision: Optional[str] = None, tokenizer_revision: Optional[str] = None,
                     seed: Optional[int] = None, gpu_memory_utilization: float = 0.9, swap_space: float = 4,
                     cpu_offload_gb: float = 0, enforce_eager: bool = False, max_seq_len_to_capture: int = 8192,
                     disable_custom_all_reduce: bool = False, disable_async_output_proc: bool = False,
                     hf_token=None, hf_overrides=None, mm_processor_kwargs=None, override_pooler_config=None,
                     compilation_config=None, **kwargs) -> None:
            from transformers import AutoTokenizer

            unknown = set(kwargs) - ENGINE_ARGS
            assert not unknown, f"not an EngineArgs field the fake knows: {unknown}"
            if state.live():  # one GPU: the first engine's memory is not free
                raise RuntimeError("CUDA out of memory: another engine holds the GPU")
            self.model_path, self.seed = model, seed
            self.gpu_memory_utilization, self.kwargs = gpu_memory_utilization, dict(kwargs)
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer or model)
            self.llm_engine = LLMEngine()
            self._model = None
            state.engines.append(weakref.ref(self))
            state.events.append(("build", dict(kwargs)))

        @property
        def model(self):
            if self._model is None:
                from transformers import AutoModelForCausalLM

                self._model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch.float32).eval()
            return self._model

        def generate(self, prompts, sampling_params=None, *, use_tqdm=True, lora_request=None, priority=None):
            assert self.llm_engine.engine_core.alive, "generate on a shut-down engine"
            prompts = [prompts] if isinstance(prompts, dict) else list(prompts)
            params = (sampling_params if isinstance(sampling_params, list)
                      else [sampling_params or SamplingParams()] * len(prompts))
            loras = lora_request if isinstance(lora_request, list) else [lora_request] * len(prompts)
            outs = []
            for n, (prompt, p, lora) in enumerate(zip(prompts, params, loras)):
                ids = list(prompt["prompt_token_ids"])
                state.calls.append((ids, p, lora))
                outs.append(RequestOutput(str(n), None, ids, None, [self._run(ids, p, lora)], True, lora))
            return outs

        def _run(self, prompt_ids, p, lora):
            tok, out = self.tokenizer, []
            stops = [p.stop] if isinstance(p.stop, str) else list(p.stop or [])
            text = ""
            for t in state.policy(self, prompt_ids, p, lora):
                out.append(int(t))
                finish, reason = None, None
                if not p.ignore_eos and t == tok.eos_token_id:
                    finish = "stop"
                elif t in (p.stop_token_ids or []):
                    finish, reason = "stop", int(t)
                elif len(out) >= p.max_tokens:
                    finish = "length"
                text = tok.decode(out, skip_special_tokens=p.skip_special_tokens)
                hits = sorted((text.find(s), s) for s in stops if s in text)
                if hits and finish != "stop":  # the detokenizer's stop-string check
                    pos, s = hits[0]
                    text = text[:pos + len(s)] if p.include_stop_str_in_output else text[:pos]
                    finish, reason = "stop", s
                if finish:
                    return CompletionOutput(0, text, out, None, None, finish, reason, lora)
            raise AssertionError("the policy ran dry")

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    inputs = types.ModuleType("vllm.inputs")
    inputs.TokensPrompt = TokensPrompt
    lora_pkg = types.ModuleType("vllm.lora")
    lora_req = types.ModuleType("vllm.lora.request")
    lora_req.LoRARequest = LoRARequest
    outputs = types.ModuleType("vllm.outputs")
    outputs.CompletionOutput, outputs.RequestOutput = CompletionOutput, RequestOutput
    vllm.inputs, vllm.lora, vllm.outputs, lora_pkg.request = inputs, lora_pkg, outputs, lora_req
    return {"vllm": vllm, "vllm.inputs": inputs, "vllm.lora": lora_pkg, "vllm.lora.request": lora_req,
            "vllm.outputs": outputs}


def model_policy(engine, prompt_ids, p, lora):
    """Tokens of the engine's model: greedy at temperature 0, else softmax(logits / T), top-p, a generator
    seeded with the request's seed (vLLM's per-request seed)."""
    gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
    ids = list(prompt_ids)
    while True:
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids])).logits[0, -1].double()
        if p.temperature == 0:
            t = int(logits.argmax())
        else:
            probs, order = torch.softmax(logits / p.temperature, -1).sort(descending=True)
            keep = (probs.cumsum(-1) - probs) < p.top_p
            t = int(order[torch.multinomial(probs * keep, 1, generator=gen)])
        ids.append(t)
        yield t


WORDS = "apple pear plum fig kiwi lime lemon melon grape peach".split()


def scripted_policy(engine, prompt_ids, p, lora):
    """Generic-template outputs chosen by the request's seed (some without a response), then EOS."""
    rng = random.Random(p.seed)
    resp = " ".join(["apple"] + [rng.choice(WORDS) for _ in range(rng.randint(0, 8))])
    thought = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12)))
    text = f"Here is my thought process:\n{thought}"
    if rng.random() > 0.15:
        text += f"\n\nHere is my response:\n{resp}"
    yield from engine.tokenizer(text, add_special_tokens=False)["input_ids"] + [engine.tokenizer.eos_token_id]
    while True:
        yield engine.tokenizer.eos_token_id


@pytest.fixture
def fake_vllm(monkeypatch):
    state = FakeState(model_policy)
    for name, module in build_fake_vllm(state).items():
        monkeypatch.setitem(sys.modules, name, module)
    yield state
    from tpo_lite import vllm_backend

    gc.collect()
    vllm_backend._ENGINES.clear()  # a failed test must not leave its engine to the next one


# ---------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random llama + byte BPE tokenizer saved to a directory (the engine loads it from there). The EOS
    row of the LM head copies the row of the token greedy decoding picks most, so some outputs end at EOS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import byte_bpe_tokenizer

    path = tmp_path_factory.mktemp("vllm_tiny") / "model"
    tok = byte_bpe_tokenizer(CORPUS)
    torch.manual_seed(0)
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       initializer_range=0.2, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                       bos_token_id=None, tie_word_embeddings=False)
    model = LlamaForCausalLM(mcfg).eval()
    cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=12)
    jobs = [make_job(f"p{i}", prompt(tok, i), tok, cfg) for i in range(4)]
    sampler = LocalSampler(model, tok, cfg, progress=False)
    counts = {}
    for _, samples in sampler.sample(jobs, 1):
        for t in samples[0].token_ids:
            counts[t] = counts.get(t, 0) + 1
    common = max(counts, key=counts.get)
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = model.lm_head.weight[common] * 1.05
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def prompt(tok, i: int) -> str:
    return tok.apply_chat_template([{"role": "user", "content": f"Question {i}: answer carefully."}],
                                   tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def jobs_for(tok, cfg, n=4):
    return [make_job(f"p{i}", prompt(tok, i), tok, cfg) for i in range(n)]


def as_records(pairs):
    return {pid: [s.to_record() for s in samples] for pid, samples in pairs}


# ------------------------------------------------------------------------------------------------- tests

def test_importing_tpo_lite_never_imports_vllm():
    code = ("import sys, tpo_lite, tpo_lite.sampling, tpo_lite.vllm_backend, tpo_lite.loop, tpo_lite.evaluate, "
            "tpo_lite.cli; assert 'vllm' not in sys.modules, 'vllm imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_without_vllm_one_clear_error(monkeypatch, tok):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    with pytest.raises(TpoError) as e:
        make_sampler(SamplingConfig(backend="vllm"), tok)
    assert e.value.field == "sampling.backend"
    assert "needs the vllm package" in str(e.value) and "pip install vllm" in str(e.value)


def test_vllm_options_are_checked():
    for kwargs, name in [({"vllm_gpu_memory_utilization": 0.0}, "vllm_gpu_memory_utilization"),
                         ({"vllm_gpu_memory_utilization": 1.5}, "vllm_gpu_memory_utilization"),
                         ({"vllm_max_lora_rank": 0}, "vllm_max_lora_rank"),
                         ({"vllm_max_model_len": 0}, "vllm_max_model_len")]:
        with pytest.raises(TpoError) as e:
            SamplingConfig(**kwargs)
        assert e.value.field == name


def test_the_example_config_selects_the_vllm_backend():
    from tpo_lite.config import load_config

    cfg = load_config(REPO / "examples" / "vllm_inprocess.toml")
    assert cfg.sampling.backend == "vllm" and cfg.sampling.vllm_max_lora_rank >= cfg.model.lora_r


@pytest.mark.parametrize("extra", [
    {},  # plain sampling up to max_new_tokens / EOS
    {"thought_budget": 5},  # budget forcing: a second request per sample after the forced marker
    {"thought_budget": 5, "response_budget": 4},
    {"response_budget": 6},
])
def test_greedy_records_equal_the_local_samplers(fake_vllm, tok, model, extra):
    """Same model, greedy: the vLLM backend writes exactly the LocalSampler's records, field by field."""
    cfg = SamplingConfig(backend="vllm", k=2, temperature=0.0, max_new_tokens=30, batch_size=4, **extra)
    template = get_template("generic")
    jobs = jobs_for(tok, cfg)
    local = as_records(LocalSampler(model, tok, cfg, template, progress=False).sample(jobs, 2))
    with make_sampler(cfg, tok, template, progress=False) as sampler:
        ours = as_records(sampler.sample(jobs, 2))
    assert ours == local
    flat = [s for samples in ours.values() for s in samples]
    for s in flat:  # the record format, types included
        assert [type(s[f]) for f in ("index", "seed", "text", "token_ids", "finish_reason", "forced")] == \
               [int, int, str, list, str, bool]
    if "thought_budget" in extra:
        assert any(s["forced"] for s in flat)
        assert any(p.seed not in {j.seeds[i] for j in jobs for i in range(2)} for _, p, _ in fake_vllm.calls)
    for ids, p, lora in fake_vllm.calls:  # every request: its seed, EOS ids as stop tokens, no adapter
        assert p.n == 1 and p.include_stop_str_in_output and p.stop_token_ids == [tok.eos_token_id]
        assert lora is None


def test_eos_records_match(fake_vllm, tok, model):
    """Some greedy outputs end at EOS (the tiny model's EOS row is rigged): the EOS is the last token id, not
    in the text, and finish_reason is 'eos' in both backends."""
    cfg = SamplingConfig(backend="vllm", k=1, temperature=0.0, max_new_tokens=40, batch_size=8)
    jobs = jobs_for(tok, cfg, n=6)
    local = as_records(LocalSampler(model, tok, cfg, progress=False).sample(jobs, 1))
    with make_sampler(cfg, tok, progress=False) as sampler:
        ours = as_records(sampler.sample(jobs, 1))
    assert ours == local
    eos = [s for samples in ours.values() for s in samples if s["finish_reason"] == "eos"]
    assert eos and all(s["token_ids"][-1] == tok.eos_token_id for s in eos)


def test_sampled_records_seeds_and_reproducibility(fake_vllm, tok):
    """Temperature > 0: each sample records its job seed, its first request uses it and a continuation a
    derived one; the records do not depend on how the prompts are batched or on a skip resume."""
    template = get_template("generic")
    base = dict(k=3, temperature=0.8, top_p=0.95, max_new_tokens=12, thought_budget=4)
    cfg = SamplingConfig(backend="vllm", batch_size=3, **base)
    jobs = jobs_for(tok, cfg)
    with make_sampler(cfg, tok, template, progress=False) as sampler:
        one_per_call = as_records(sampler.sample(jobs, 3))
    first_requests = [p.seed for ids, p, _ in fake_vllm.calls if ids in [j.prompt_token_ids for j in jobs]]
    assert sorted(first_requests) == sorted(s for j in jobs for s in j.seeds)
    with make_sampler(SamplingConfig(backend="vllm", batch_size=64, **base), tok, template,
                      progress=False) as sampler:
        all_in_one = as_records(sampler.sample(jobs, 3))
        resumed = as_records(sampler.sample(jobs, 3, skip={"p0", "p2"}))
    assert one_per_call == all_in_one
    assert resumed == {pid: all_in_one[pid] for pid in ("p1", "p3")}
    for j in jobs:
        assert [s["seed"] for s in all_in_one[j.prompt_id]] == j.seeds[:3]
        assert [s["index"] for s in all_in_one[j.prompt_id]] == [0, 1, 2]
        assert all(s["forced"] for s in all_in_one[j.prompt_id])  # the random model never writes the marker
    assert len({tuple(s["token_ids"]) for r in all_in_one.values() for s in r}) > 1


def write_adapter(path: Path, rank: int, weights: bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({"r": rank, "lora_alpha": 8, "peft_type": "LORA",
                                                          "target_modules": ["q_proj", "v_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(weights)
    return path


def test_lora_request_carries_the_adapters_content_hash(fake_vllm, tok, tmp_path):
    from tpo_lite.rundir import adapter_digest

    cfg = SamplingConfig(backend="vllm", k=1, temperature=0.0, max_new_tokens=4, vllm_max_lora_rank=8)
    ad = write_adapter(tmp_path / "iter_01" / "adapter", 4, b"first weights")
    sampler = make_sampler(cfg, tok, adapter=str(ad), progress=False)
    list(sampler.sample(jobs_for(tok, cfg, n=2), 1))
    digest = adapter_digest(ad)
    loras = {(lo.lora_name, lo.lora_int_id, lo.lora_path) for _, _, lo in fake_vllm.calls}
    assert loras == {(f"tpo-{digest[:12]}", int(digest[:8], 16) % 0x7FFFFFFF + 1, str(ad.resolve()))}
    assert fake_vllm.events[0] == ("build", {"enable_lora": True, "max_lora_rank": 8, "max_loras": 1})
    # Retrained at the same path: another id, so vLLM cannot serve the old weights from its cache.
    write_adapter(ad, 4, b"retrained weights")
    fake_vllm.calls.clear()
    sampler.ensure_adapter(ad)
    list(sampler.sample(jobs_for(tok, cfg, n=1), 1))
    (_, _, lora), = fake_vllm.calls
    assert lora.lora_int_id != int(digest[:8], 16) % 0x7FFFFFFF + 1
    assert lora.lora_int_id == int(adapter_digest(ad)[:8], 16) % 0x7FFFFFFF + 1
    sampler.close()
    # A rank the engine cannot serve is refused before anything is sampled.
    big = write_adapter(tmp_path / "big", 32, b"w")
    with pytest.raises(TpoError) as e:
        make_sampler(cfg, tok, adapter=str(big), progress=False)
    assert e.value.field == "sampling.vllm_max_lora_rank" and "rank 32" in str(e.value)


def test_engine_lives_while_sampling_and_is_shut_down_after(fake_vllm, tok):
    cfg = SamplingConfig(backend="vllm", k=1, temperature=0.0, max_new_tokens=4)
    from tpo_lite import vllm_backend

    sampler = make_sampler(cfg, tok, progress=False)
    assert fake_vllm.live() == []  # built at the first sample() call, not before
    list(sampler.sample(jobs_for(tok, cfg, n=1), 1))
    engine = weakref.ref(sampler.engine)
    other = make_sampler(dataclasses.replace(cfg, temperature=0.5), tok, progress=False)
    list(other.sample(jobs_for(tok, cfg, n=1), 1))  # a second sampler shares the one engine
    assert len(fake_vllm.engines) == 1 and len(fake_vllm.live()) == 1
    sampler.close()
    assert len(fake_vllm.live()) == 1  # still used by `other`
    del other  # dropped without close(): its finalizer releases the engine
    assert fake_vllm.live() == [] and vllm_backend.live_engines() == 0
    gc.collect()
    assert engine() is None  # no reference kept: vLLM can free everything
    list(sampler.sample(jobs_for(tok, cfg, n=1), 1))  # a closed sampler builds a fresh engine
    assert len(fake_vllm.engines) == 2
    sampler.close()
    assert fake_vllm.live() == []


def write_run(tmp_path: Path) -> tuple[Path, Path]:
    """A 2-iteration run config on the vllm backend over a tiny model: (config path, model directory)."""
    from test_loop import build_tiny_model, model_table, write_instructions

    model_dir = build_tiny_model(tmp_path / "model")
    tr = write_instructions(tmp_path / "train.jsonl", 10, "tr")
    ho = write_instructions(tmp_path / "heldout.jsonl", 3, "ho")
    recs = [json.loads(line) for line in ho.read_text().splitlines()]  # texts unlike the training ones
    ho.write_text("".join(json.dumps({**r, "instruction": "Held out: " + r["instruction"]}) + "\n" for r in recs))
    cfg_path = tmp_path / "cfg.toml"
    cfg_path.write_text(f"""
{model_table(model_dir)}

[prompts]
template = "generic"

[sampling]
backend = "vllm"
k = 4
max_new_tokens = 160
seed = 7
vllm_max_lora_rank = 8

[judge]
kind = "programmatic"

[train]
learning_rate = 1e-3
batch_size = 2
grad_accum = 1
epochs = 1

[loop]
name = "v"
runs_root = "{tmp_path / 'runs'}"
iterations = 2
prompts_per_iteration = 4
train_instructions = "{tr}"
stage_processes = false  # the fake engine and the checks live in this process

[eval]
eval_set = "{ho}"
max_instructions = 2
max_new_tokens = 160
n_boot = 50
""")
    return cfg_path, model_dir


def test_run_frees_the_engine_before_every_training_stage(fake_vllm, tmp_path, monkeypatch):
    """A whole 2-iteration run on the vllm backend (generation and held-out eval through the fake engine):
    every DPO training starts with no engine alive, iteration 2 samples with iteration 1's adapter (id from its
    content hash), and the records have the local backend's format."""
    from transformers import AutoTokenizer

    from tpo_lite import train, vllm_backend
    from tpo_lite.config import load_config
    from tpo_lite.jsonl import read_records
    from tpo_lite.loop import run
    from tpo_lite.rundir import adapter_digest

    fake_vllm.policy = scripted_policy
    cfg_path, model_dir = write_run(tmp_path)
    seen = []
    real_train = train.train_iteration

    def checked_train(*args, **kwargs):
        seen.append((len(fake_vllm.live()), vllm_backend.live_engines()))
        return real_train(*args, **kwargs)

    monkeypatch.setattr(train, "train_iteration", checked_train)
    run(load_config(cfg_path), progress=False, echo=lambda s: None)
    assert seen == [(0, 0), (0, 0)]
    assert fake_vllm.live() == [] and len(fake_vllm.engines) >= 3  # per stage: built, used, shut down
    rd = tmp_path / "runs" / "v"
    eos = AutoTokenizer.from_pretrained(model_dir).eos_token_id
    digest = adapter_digest(rd / "iter_01" / "adapter")
    it2 = read_records(rd / "iter_02" / "samples.jsonl", key="prompt_id")
    it2_prompts = {tuple(r["prompt_token_ids"]) for r in it2.values()}
    loras = {lo.lora_int_id if lo else None for ids, _, lo in fake_vllm.calls if tuple(ids) in it2_prompts}
    assert loras == {int(digest[:8], 16) % 0x7FFFFFFF + 1}
    for rec in it2.values():
        for s in rec["samples"]:
            assert set(s) == {"index", "seed", "text", "token_ids", "thought", "response", "valid",
                              "invalid_reason", "finish_reason", "forced"}
            assert s["token_ids"][-1] == eos and s["finish_reason"] == "eos"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_real_vllm_on_a_tiny_model(tmp_path):
    """The real engine (when vllm is installed): records of the local format with budget forcing, per-sample
    seeds reproducible, a LoRA adapter served, and the GPU memory back after close()."""
    pytest.importorskip("vllm")
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from tiny_models import byte_bpe_tokenizer

    tok = byte_bpe_tokenizer(CORPUS)
    torch.manual_seed(0)  # head_dim 64: a size every vLLM attention backend takes
    mcfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                       tie_word_embeddings=False)
    path = tmp_path / "model"
    model = LlamaForCausalLM(mcfg).to(torch.bfloat16)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(tmp_path / "adapter")
    cfg = SamplingConfig(backend="vllm", k=2, temperature=0.8, max_new_tokens=24, thought_budget=8,
                         vllm_gpu_memory_utilization=0.3, vllm_max_lora_rank=8, vllm_max_model_len=512)
    template = get_template("generic")
    jobs = jobs_for(tok, cfg, n=3)
    free_before = torch.cuda.mem_get_info()[0]
    runs = []
    for _ in range(2):
        with make_sampler(cfg, tok, template, adapter=str(tmp_path / "adapter"), progress=False) as sampler:
            runs.append(as_records(sampler.sample(jobs, 2)))
    assert runs[0] == runs[1]
    for j in jobs:
        for i, s in enumerate(runs[0][j.prompt_id]):
            assert s["index"] == i and s["seed"] == j.seeds[i] and s["finish_reason"] in ("eos", "length")
            assert s["token_ids"] and len(s["token_ids"]) <= cfg.max_new_tokens
            if s["forced"]:
                assert "Here is my response:" in s["text"]
    gc.collect()
    assert torch.cuda.mem_get_info()[0] > free_before - (1 << 30)  # the engine's memory is back


def test_eval_resume_ignores_the_engine_options(tmp_path):
    """The vllm_* options do not change what is generated: a resumed evaluation may change them (before, its
    outputs were refused as generated "with other settings")."""
    from tpo_lite import evaluate as ev
    from tpo_lite.config import load_config

    cfg_path, _ = write_run(tmp_path)

    def factory(cfg, tokenizer, template, model=None, adapter=None, progress=True):
        return types.SimpleNamespace(sample=lambda jobs, k=None: (
            (j.prompt_id, [Sample(0, j.seeds[0], "Here is my thought process:\nx\n\nHere is my response:\napple",
                                  [1], "eos")]) for j in jobs))

    config = load_config(cfg_path)
    items = ev.load_eval_set(config.eval.eval_set)
    path = tmp_path / "eval" / "outputs.jsonl"
    first = ev.model_outputs(config, items, path, progress=False, echo=lambda s: None, sampler_factory=factory)
    other = load_config(cfg_path, ["sampling.vllm_gpu_memory_utilization=0.5", "sampling.vllm_max_lora_rank=32",
                                   "sampling.vllm_max_model_len=256"])
    again = ev.model_outputs(other, items, path, progress=False, echo=lambda s: None, sampler_factory=factory)
    assert [dataclasses.asdict(o) for o in again] == [dataclasses.asdict(o) for o in first]
