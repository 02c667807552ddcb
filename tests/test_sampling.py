"""Tests for tpo_lite.sampling: token selection against a float64 reference, the KV-cached loop against a
no-cache float64 reference, seeds, EOS / length / stop / budget forcing, and the OpenAI sampler against a
fake server on 127.0.0.1."""
import time

import numpy as np
import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.prompts import get_template
from tpo_lite.sampling import (LocalSampler, OpenAISampler, PromptJob, SamplingConfig, ServerError,
                               make_job, sample_seed, select_tokens)

from fake_server import FakeServer

CORPUS = [
    "Here is my thought process: think about the question carefully.",
    "Here is my response: the answer is short and clear.",
    "The quick brown fox jumps over the lazy dog. STOP now. <R> done </R>",
    "Respond to the following user query in a comprehensive and detailed way.",
]


def tiny_tokenizer():
    from tiny_models import byte_bpe_tokenizer

    return byte_bpe_tokenizer(CORPUS)


def tiny_model(tokenizer, seed=0, init=0.2):
    from tiny_models import tiny_llama

    return tiny_llama(len(tokenizer), seed=seed, tokenizer=tokenizer, max_position_embeddings=512,
                      initializer_range=init).eval()


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(tok)


def job(tok, pid, text, k, run_seed=0):
    return make_job(pid, text, tok, SamplingConfig(k=k, seed=run_seed))


def collect(sampler, jobs, k):
    return dict(sampler.sample(jobs, k))


class ScriptedLogits:
    """Forward hook on lm_head that makes token script[t] overwhelmingly likely at decoding step t (call 0 is
    the prefill), for a single-row batch. After the script: `after` (a token id) or nothing."""

    def __init__(self, model, script, after=None):
        self.script, self.after, self.calls = list(script), after, 0
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        t = self.calls
        self.calls += 1
        target = self.script[t] if t < len(self.script) else self.after
        if target is None:
            return output
        out = output.clone()
        out[..., target] += 1e4
        return out

    def remove(self):
        self.handle.remove()


# ------------------------------------------------------------------------------------------ select_tokens

def reference_select(logits, temperature, top_p, u):
    """float64 numpy reference of temperature + top-p inverse-CDF sampling (returns token, margin)."""
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.lexsort((np.arange(len(p)), -p))  # descending prob, ties by id
    sp = p[order]
    before = np.concatenate([[0.0], np.cumsum(sp)[:-1]])
    n_keep = int((before < top_p).sum())
    kept = sp[:n_keep]
    cum = np.cumsum(kept)
    thr = u * cum[-1]
    pos = int((cum <= thr).sum())
    margin = np.min(np.abs(cum - thr))
    return order[min(pos, n_keep - 1)], margin


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.8, 0.95), (0.5, 0.5), (1.3, 0.2)])
def test_select_tokens_matches_float64_reference(temperature, top_p):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 50, generator=g) * 2
    u = torch.rand(64, generator=g)
    got = select_tokens(logits, temperature, top_p, u).tolist()
    checked = 0
    for row in range(64):
        want, margin = reference_select(logits[row].numpy(), temperature, top_p, float(u[row]))
        if margin < 1e-5:  # float32 vs float64 may legitimately differ exactly at a CDF boundary
            continue
        assert got[row] == want, row
        checked += 1
    assert checked >= 60


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_tokens_candidate_path_equals_full_sort(dtype):
    """The top-k shortcut must pick exactly what sorting the whole vocabulary picks, including rows whose
    top-p set is larger than the candidates (fallback) and bf16 logits full of ties."""
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([0.5, 1.0, 4.0, 8.0] * 16).unsqueeze(-1)  # flat rows need the fallback
    logits = (torch.randn(64, 2000, generator=g) * scale).to(dtype)
    u = torch.rand(64, generator=g)
    for top_p in (0.5, 0.9, 0.95):
        fast = select_tokens(logits, 0.8, top_p, u, candidates=64)
        full = select_tokens(logits, 0.8, top_p, u, candidates=10 ** 6)
        assert torch.equal(fast, full), top_p


def test_select_tokens_greedy_and_distribution():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0, 0.5]])
    assert select_tokens(logits, 0.0, 0.9, torch.zeros(1)).tolist() == [1]
    # Empirical frequencies follow the top-p truncated distribution.
    p = torch.softmax(logits[0].double(), -1).numpy()
    order = np.argsort(-p)
    keep = order[: int((np.concatenate([[0], np.cumsum(p[order])[:-1]]) < 0.8).sum())]
    want = np.zeros(5)
    want[keep] = p[keep] / p[keep].sum()
    n = 40000
    u = torch.rand(n, generator=torch.Generator().manual_seed(0))
    got = select_tokens(logits.expand(n, 5), 1.0, 0.8, u)
    freq = np.bincount(got.numpy(), minlength=5) / n
    assert np.abs(freq - want).max() < 0.01, (freq, want)
    assert all(freq[i] == 0 for i in range(5) if i not in keep)


# ----------------------------------------------------------------------------------------- seeds, config

def test_sample_seed_is_stable_and_distinct():
    assert sample_seed(0, "train-0001", 3) == sample_seed(0, "train-0001", 3)
    seeds = {sample_seed(s, p, i) for s in (0, 1) for p in ("a", "b") for i in range(8)}
    assert len(seeds) == 32
    assert all(0 <= s < 2 ** 31 for s in seeds)


@pytest.mark.parametrize("kwargs,fieldname", [
    ({"top_p": 0.0}, "top_p"), ({"k": 0}, "k"), ({"temperature": -1.0}, "temperature"),
    ({"thought_budget": 512, "max_new_tokens": 512}, "thought_budget"), ({"stop": [""]}, "stop"),
    ({"base_url": "localhost:8000"}, "base_url"), ({"max_retries": -1}, "max_retries"),
])
def test_bad_config_names_the_field(kwargs, fieldname):
    with pytest.raises(TpoError) as e:
        SamplingConfig(**kwargs)
    assert e.value.field == fieldname


def test_bad_sampling_table_in_a_run_config_names_file_line_field(tmp_path):
    from tpo_lite.config import load_config

    p = tmp_path / "run.toml"
    p.write_text("[sampling]\nk = 4\nmax_new_tokens = 64\nthought_budget = 64\n")
    with pytest.raises(TpoError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:4: sampling.thought_budget: must be >= 1 and below max_new_tokens")
    p.write_text('[sampling]\nbackend = "sglang"\n')
    with pytest.raises(TpoError, match=r":2: sampling.backend: must be one of 'local', 'openai', 'vllm'"):
        load_config(p)


def test_config_fields_all_have_help():
    import dataclasses

    for f in dataclasses.fields(SamplingConfig):
        assert len(f.metadata.get("help", "")) > 20, f.name


def test_budget_forcing_needs_a_response_marker(tok, model):
    with pytest.raises(TpoError, match="response marker"):
        LocalSampler(model, tok, SamplingConfig(thought_budget=4, max_new_tokens=16), get_template("direct"))


def test_jobs_need_enough_seeds(tok, model):
    s = LocalSampler(model, tok, SamplingConfig(k=4, max_new_tokens=4), progress=False)
    bad = PromptJob("p", "x", [5, 6], [1, 2])
    with pytest.raises(TpoError, match="needs 4 seeds"):
        list(s.sample([bad], 4))


# ------------------------------------------------------------------------------------------ local loop

def no_cache_reference(model, prompt_ids, seed, temperature, top_p, n_steps, eos):
    """Plain float64 sampling without a KV cache: full forward over prompt+output at every step."""
    m64 = model.double()
    try:
        gen = torch.Generator().manual_seed(seed)
        ids = []
        for _ in range(n_steps):
            x = torch.tensor([prompt_ids + ids])
            with torch.no_grad():
                logits = m64(input_ids=x).logits[0, -1].numpy()
            u = float(torch.rand((), generator=gen))
            tok_id, _ = reference_select(logits, temperature, top_p, u)
            ids.append(int(tok_id))
            if tok_id in eos:
                break
        return ids
    finally:
        model.float()


def test_cached_loop_matches_no_cache_float64_reference(tok, model):
    cfg = SamplingConfig(k=3, temperature=0.9, top_p=0.9, max_new_tokens=12, batch_size=6)
    jobs = [job(tok, "a", "Here is my thought process:", 3), job(tok, "b", "The quick brown fox jumps", 3)]
    model.double()  # same precision as the reference, so only the algorithm can differ
    try:
        got = collect(LocalSampler(model, tok, cfg, progress=False), jobs, 3)
    finally:
        model.float()
    for j in jobs:
        for s in got[j.prompt_id]:
            want = no_cache_reference(model, j.prompt_token_ids, s.seed, 0.9, 0.9, 12, {tok.eos_token_id})
            assert s.token_ids == want, (j.prompt_id, s.index)
            assert s.finish_reason == ("eos" if want[-1] == tok.eos_token_id else "length")


def test_greedy_matches_transformers_generate_with_left_padding(tok, model):
    cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=10, batch_size=2)
    jobs = [job(tok, "short", "Here", 1), job(tok, "long", "Respond to the following user query in a", 1)]
    assert len(jobs[0].prompt_token_ids) != len(jobs[1].prompt_token_ids)
    got = collect(LocalSampler(model, tok, cfg, progress=False), jobs, 1)
    for j in jobs:
        out = model.generate(torch.tensor([j.prompt_token_ids]), do_sample=False, max_new_tokens=10,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert got[j.prompt_id][0].token_ids == out[0, len(j.prompt_token_ids):].tolist()


def test_seeds_reproducible_across_batch_layouts(tok, model):
    jobs = [job(tok, "a", "Here is my", 4), job(tok, "b", "The quick brown fox jumps over", 4)]
    outs = []
    for bs in (1, 3, 8):
        cfg = SamplingConfig(k=4, max_new_tokens=10, batch_size=bs, temperature=1.0, top_p=1.0)
        outs.append(collect(LocalSampler(model, tok, cfg, progress=False), jobs, 4))
    for o in outs[1:]:
        assert {p: [s.token_ids for s in v] for p, v in o.items()} == \
               {p: [s.token_ids for s in v] for p, v in outs[0].items()}
    # Resume: sampling only prompt b again gives the same samples as in the full run.
    cfg = SamplingConfig(k=4, max_new_tokens=10, batch_size=4, temperature=1.0, top_p=1.0)
    again = collect(LocalSampler(model, tok, cfg, progress=False), jobs[1:], 4)
    assert [s.token_ids for s in again["b"]] == [s.token_ids for s in outs[0]["b"]]
    # Different seeds give different samples.
    texts = [s.text for s in outs[0]["a"]]
    assert len(set(texts)) > 1
    assert [s.seed for s in outs[0]["a"]] == jobs[0].seeds


def test_yields_each_prompt_once_in_order_with_all_samples(tok, model):
    jobs = [job(tok, f"p{i}", "Here is", 3) for i in range(3)]
    cfg = SamplingConfig(k=3, max_new_tokens=3, batch_size=4)  # batches straddle prompts
    out = list(LocalSampler(model, tok, cfg, progress=False).sample(jobs, 3))
    assert [p for p, _ in out] == ["p0", "p1", "p2"]
    for _, samples in out:
        assert [s.index for s in samples] == [0, 1, 2]
        for s in samples:  # a random model may sample EOS early
            ended = s.token_ids[-1] == tok.eos_token_id
            assert s.finish_reason == ("eos" if ended else "length")
            assert len(s.token_ids) == 3 or ended


def test_eos_is_kept_in_ids_not_in_text(tok, model):
    a = tok.convert_tokens_to_ids("a")
    hook = ScriptedLogits(model, [a, a, tok.eos_token_id])
    try:
        out = collect(LocalSampler(model, tok, SamplingConfig(k=1, max_new_tokens=10), progress=False),
                      [job(tok, "p", "Here", 1)], 1)
    finally:
        hook.remove()
    s = out["p"][0]
    assert s.token_ids == [a, a, tok.eos_token_id]
    assert s.text == "aa" and s.finish_reason == "eos" and not s.forced


def test_stop_string_ends_output(tok, model):
    ids = tok("xxSTOPyy", add_special_tokens=False)["input_ids"]
    hook = ScriptedLogits(model, ids)
    try:
        cfg = SamplingConfig(k=1, max_new_tokens=20, stop=["STOP"])
        s = collect(LocalSampler(model, tok, cfg, progress=False), [job(tok, "p", "Here", 1)], 1)["p"][0]
    finally:
        hook.remove()
    assert s.finish_reason == "stop" and s.text.endswith("STOP") and s.text.startswith("xx")
    assert "yy" not in s.text


def test_budget_forcing_appends_marker_to_text_and_ids(tok, model):
    template = get_template("generic")
    forced_ids = tok(template.forced_response_text, add_special_tokens=False)["input_ids"]
    cfg = SamplingConfig(k=2, max_new_tokens=20, thought_budget=5)
    out = collect(LocalSampler(model, tok, cfg, template, progress=False), [job(tok, "p", "Here", 2)], 2)
    for s in out["p"]:
        if tok.eos_token_id in s.token_ids[:5]:
            continue  # EOS inside the thought takes the EOS path (tested below)
        assert s.forced
        assert s.token_ids[5:5 + len(forced_ids)] == forced_ids
        assert "Here is my response:" in s.text
        assert len(s.token_ids) <= 20
        assert s.text == tok.decode(s.token_ids, skip_special_tokens=True)


def test_budget_forcing_on_eos_drops_it_and_forces(tok, model):
    template = get_template("generic")
    forced_ids = tok(template.forced_response_text, add_special_tokens=False)["input_ids"]
    a = tok.convert_tokens_to_ids("a")
    eos = tok.eos_token_id
    # thought "a" then EOS; after the forced marker (fed, not sampled) the response "a" then EOS.
    script = [a, eos] + [None] * (len(forced_ids) - 1) + [a, eos]
    hook = ScriptedLogits(model, script)
    try:
        cfg = SamplingConfig(k=1, max_new_tokens=30, thought_budget=10)
        s = collect(LocalSampler(model, tok, cfg, template, progress=False), [job(tok, "p", "Here", 1)], 1)["p"][0]
    finally:
        hook.remove()
    assert s.forced and s.finish_reason == "eos"
    assert s.token_ids == [a] + forced_ids + [a, eos]
    assert s.text == "a\n\nHere is my response:\na"


def test_model_writing_the_marker_itself_is_not_forced(tok, model):
    template = get_template("generic")
    eos = tok.eos_token_id
    ids = tok("ok\nHere's my response: yes", add_special_tokens=False)["input_ids"]
    hook = ScriptedLogits(model, ids + [eos])
    try:
        cfg = SamplingConfig(k=1, max_new_tokens=40, thought_budget=len(ids) + 3)
        s = collect(LocalSampler(model, tok, cfg, template, progress=False), [job(tok, "p", "Here", 1)], 1)["p"][0]
    finally:
        hook.remove()
    assert not s.forced and s.finish_reason == "eos"
    assert s.token_ids == ids + [eos]


def test_thought_stop_forces_the_marker(tok, model):
    template = get_template("generic")
    forced_ids = tok(template.forced_response_text, add_special_tokens=False)["input_ids"]
    ids = tok("hmm </R>", add_special_tokens=False)["input_ids"]
    hook = ScriptedLogits(model, ids)
    try:
        cfg = SamplingConfig(k=1, max_new_tokens=40, thought_budget=30, thought_stop=["</R>"])
        s = collect(LocalSampler(model, tok, cfg, template, progress=False), [job(tok, "p", "Here", 1)], 1)["p"][0]
    finally:
        hook.remove()
    assert s.forced
    assert s.token_ids[:len(ids) + len(forced_ids)] == ids + forced_ids


def test_training_mode_restored(tok, model):
    model.train()
    try:
        list(LocalSampler(model, tok, SamplingConfig(k=1, max_new_tokens=2), progress=False)
             .sample([job(tok, "p", "Here", 1)], 1))
        assert model.training
    finally:
        model.eval()


# ------------------------------------------------------------------------------------------ speed levers

def lora_model(tok, seed=0):
    from peft import LoraConfig, get_peft_model

    base = tiny_model(tok, seed=seed)
    torch.manual_seed(seed + 1)  # init_lora_weights=False: B is random, so the adapter changes the outputs
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(base, cfg).eval()


def test_merged_adapter_samples_the_same_greedy_tokens(tok):
    peft_model = lora_model(tok)
    cfg = SamplingConfig(k=1, temperature=0.0, max_new_tokens=16, batch_size=2)
    jobs = [job(tok, "a", "Here is my thought process:", 1), job(tok, "b", "The quick brown fox", 1)]
    fast = LocalSampler(peft_model, tok, cfg, progress=False)
    # The sampler decodes with a merged copy: no LoRA layer left in it, and the caller's model is untouched.
    assert not any(hasattr(m, "lora_A") for m in fast.model.modules())
    assert not any(getattr(m, "merged", False) for m in peft_model.modules() if hasattr(m, "lora_A"))
    merged = collect(fast, jobs, 1)
    unmerged = collect(LocalSampler(peft_model, tok, cfg, progress=False, reference=True), jobs, 1)
    with peft_model.disable_adapter():
        base = collect(LocalSampler(peft_model, tok, cfg, progress=False, reference=True), jobs, 1)
    for j in jobs:
        assert merged[j.prompt_id][0].token_ids == unmerged[j.prompt_id][0].token_ids
    assert any(base[j.prompt_id][0].token_ids != merged[j.prompt_id][0].token_ids for j in jobs)  # not vacuous


def test_sampling_copy_leaves_plain_models_alone(tok, model):
    from tpo_lite.models import sampling_copy

    assert sampling_copy(model) is model


class EosBias:
    """Forward hook on lm_head adding `bias` to the EOS logit, so samples end at scattered lengths."""

    def __init__(self, model, eos, bias):
        self.eos, self.bias = eos, bias
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        out = output.clone()
        out[..., self.eos] += self.bias
        return out


def test_fast_decoding_equals_the_reference_path(tok, model, monkeypatch):
    """Our decoding attention, the KV buffers, the 4D mask, the deferred dropping of finished rows and the
    prefill's last-position index give the same samples as the plain path (float64, so only the algorithm
    could differ)."""
    import tpo_lite.sampling as sampling

    buffered = []
    real = sampling._buffer_cache
    monkeypatch.setattr(sampling, "_buffer_cache", lambda cache: buffered.append(real(cache)) or buffered[-1])
    cfg = SamplingConfig(k=4, temperature=1.0, top_p=0.9, max_new_tokens=80, batch_size=12)
    jobs = [job(tok, f"p{i}", text, 4) for i, text in enumerate(
        ["Here is my", "The quick brown fox jumps over", "Respond", "STOP now", "Here is my response:"])]
    hook = EosBias(model, tok.eos_token_id, 3.0)
    model.double()
    try:
        fast = collect(LocalSampler(model, tok, cfg, progress=False), jobs, 4)
        ref = collect(LocalSampler(model, tok, cfg, progress=False, reference=True), jobs, 4)
    finally:
        model.float()
        hook.handle.remove()
    assert model.config._attn_implementation == "sdpa"  # restored after sampling
    assert buffered == [True, True]  # two batches (3 + 2 prompts), both decoded through the KV buffers
    for j in jobs:
        assert [(s.token_ids, s.finish_reason) for s in fast[j.prompt_id]] == \
               [(s.token_ids, s.finish_reason) for s in ref[j.prompt_id]], j.prompt_id
    lengths = {len(s.token_ids) for v in fast.values() for s in v if s.finish_reason == "eos"}
    assert len(lengths) >= 5 and max(len(s.token_ids) for v in fast.values() for s in v) > 64  # buffers grew


def test_batch_layout_and_skip_resume_exactly(tok, model, monkeypatch):
    cfg = SamplingConfig(k=2, max_new_tokens=10, batch_size=5, temperature=1.0, top_p=1.0)
    sampler = LocalSampler(model, tok, cfg, progress=False)
    assert sampler.groups(5, 2) == [[(0, 0), (0, 1), (1, 0), (1, 1)], [(2, 0), (2, 1), (3, 0), (3, 1)],
                                    [(4, 0), (4, 1)]]
    small = LocalSampler(model, tok, SamplingConfig(k=3, batch_size=2), progress=False)
    assert small.groups(2, 3) == [[(0, 0), (0, 1)], [(0, 2)], [(1, 0), (1, 1)], [(1, 2)]]
    jobs = [job(tok, f"p{i}", "Here is my" + " thought" * i, 2) for i in range(5)]
    full = list(sampler.sample(jobs, 2))
    assert [p for p, _ in full] == ["p0", "p1", "p2", "p3", "p4"]
    # A crash after p0, p1, p2 were recorded (p2 and p3 share a batch): resume with the whole job list.
    decoded = []
    real = sampler._generate
    monkeypatch.setattr(sampler, "_generate", lambda rows: decoded.append([j.prompt_id for j, _ in rows]) or real(rows))
    again = list(sampler.sample(jobs, 2, skip={"p0", "p1", "p2"}))
    assert [p for p, _ in again] == ["p3", "p4"]
    assert decoded == [["p2", "p2", "p3", "p3"], ["p4", "p4"]]  # p2's batch redone whole, p0/p1's not at all
    want = dict(full)
    for pid, samples in again:
        assert [s.token_ids for s in samples] == [s.token_ids for s in want[pid]]

# ------------------------------------------------------------------------------------------ fake server

class FakeVLLM(FakeServer):
    """A tiny OpenAI/vLLM-like server: deterministic completions from the seed, scripted failures."""

    def __init__(self):
        self.fail_next = 0  # answer this many completion requests with HTTP 500
        self.fail_prompt = None  # prompt (token list) that always gets 500
        self.delay_s = 0.0
        self.lora_ok = True
        self.loras = {}
        self.finish = "stop"
        self.send_token_ids = True  # True: choices[].token_ids; False: logprobs.tokens; None: neither
        self.stop_reason = None
        self.script = []  # canned choices answered in order (before the seed-derived default)
        super().__init__(self.answer)

    def answer(self, method, path, body):
        if method == "GET":
            if path == "/v1/models":
                data = [{"id": "base-model", "root": "/models/base", "parent": None}]
                data += [{"id": n, "root": p, "parent": "base-model"} for n, p in self.loras.items()]
                return 200, {"object": "list", "data": data}
            return 404, {"message": "not found"}
        if path == "/v1/load_lora_adapter":
            if not self.lora_ok:
                return 404, {"detail": "Not Found"}
            self.loras[body["lora_name"]] = body["lora_path"]
            return 200, b"Success: LoRA adapter added successfully."
        if path != "/v1/completions":
            return 404, {"message": "not found"}
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail_next > 0 or body["prompt"] == self.fail_prompt:
            self.fail_next = max(self.fail_next - 1, 0)
            return 500, {"message": "engine overloaded"}
        if body["model"] not in ("base-model", *self.loras):
            return 404, {"message": f"model {body['model']} does not exist"}
        if self.script:
            return 200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"],
                         "choices": [{"index": 0, "stop_reason": None, **self.script.pop(0)}]}
        n = min(body["max_tokens"], 3)
        ids = [10 + (body["seed"] + i) % 50 for i in range(n)]
        finish = "length" if body["max_tokens"] <= 3 else self.finish
        if finish == "stop":
            ids.append(2)  # EOS, as vLLM includes it in token_ids
        choice = {"index": 0, "text": "".join(f"<{t}>" for t in ids if t != 2),
                  "finish_reason": finish, "stop_reason": None}
        if self.stop_reason is not None:
            choice["stop_reason"] = self.stop_reason
        if self.send_token_ids:
            choice["token_ids"] = ids
        elif self.send_token_ids is False:
            choice["logprobs"] = {"tokens": [f"token_id:{t}" for t in ids]}
        return 200, {"id": "cmpl-1", "object": "text_completion", "model": body["model"], "choices": [choice]}

    def completions(self):
        return [r.body for r in self.requests if r.path == "/v1/completions"]


@pytest.fixture
def server():
    with FakeVLLM() as s:
        yield s


class EosTok:
    """Minimal tokenizer stand-in for the server tests (eos id 2; text re-tokenised by character)."""

    eos_token_id = 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 200 + 3 for c in text]}


def server_jobs(n, k, seed=0):
    return [PromptJob(f"p{i}", f"prompt {i}", [1, 5 + i], [sample_seed(seed, f"p{i}", j) for j in range(k)])
            for i in range(n)]


def test_openai_sampler_success(server, monkeypatch):
    monkeypatch.setenv("TPO_TEST_KEY", "sekret")
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=3, max_new_tokens=16, concurrency=4,
                         api_key_env="TPO_TEST_KEY", temperature=0.7, top_p=0.9)
    jobs = server_jobs(4, 3)
    out = dict(OpenAISampler(cfg, EosTok(), progress=False).sample(jobs, 3))
    assert sorted(out) == ["p0", "p1", "p2", "p3"]
    for j in jobs:
        samples = out[j.prompt_id]
        assert [s.index for s in samples] == [0, 1, 2]
        for s in samples:
            assert s.seed == j.seeds[s.index]
            assert s.token_ids == [10 + (s.seed + i) % 50 for i in range(3)] + [2]
            assert s.finish_reason == "eos" and not s.forced
    reqs = server.completions()
    assert len(reqs) == 12
    assert all(r["model"] == "base-model" and r["n"] == 1 and r["temperature"] == 0.7 and r["top_p"] == 0.9
               and r["max_tokens"] == 16 for r in reqs)
    assert sorted(tuple(r["prompt"]) for r in reqs) == sorted(tuple(j.prompt_token_ids) for j in jobs for _ in range(3))
    assert sorted(r["seed"] for r in reqs) == sorted(s for j in jobs for s in j.seeds)
    assert all(auth == "Bearer sekret" for p, _, auth in server.requests)
    # Once the server has returned token_ids, logprobs are no longer requested.
    assert "logprobs" in reqs[0] and "logprobs" not in reqs[-1]


def test_openai_sampler_reads_token_ids_from_logprobs(server):
    server.send_token_ids = False
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16)
    (pid, samples), = OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(1, 1), 1)
    s = samples[0]
    assert s.token_ids == [10 + (s.seed + i) % 50 for i in range(3)] + [2]


def test_openai_sampler_retokenises_as_a_counted_fallback(server):
    server.send_token_ids = None
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16)
    sampler = OpenAISampler(cfg, EosTok(), progress=False)
    (pid, (s,)), = sampler.sample(server_jobs(1, 1), 1)
    assert sampler.retokenised == 1
    assert s.token_ids == EosTok()(s.text)["input_ids"] + [2]


def test_openai_sampler_stop_string(server):
    server.stop_reason = "<12>"
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16, stop=["<12>"])
    (pid, (s,)), = OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(1, 1), 1)
    assert s.finish_reason == "stop"
    assert server.completions()[0]["stop"] == ["<12>"] and server.completions()[0]["include_stop_str_in_output"]


def test_openai_sampler_retries_after_500(server):
    server.fail_next = 2
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16, concurrency=1,
                         max_retries=3, backoff_s=0.01)
    out = dict(OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(1, 1), 1))
    assert out["p0"][0].finish_reason == "eos"
    assert len(server.completions()) == 3  # two 500s, then success


def test_openai_sampler_gives_up_with_clear_error_keeping_partial_work(server):
    server.fail_prompt = [1, 6]  # prompt p1 always fails
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=2, max_new_tokens=16, concurrency=1,
                         max_retries=2, backoff_s=0.01)
    got = []
    with pytest.raises(ServerError) as e:
        for pid, samples in OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(2, 2), 2):
            got.append(pid)
    assert got == ["p0"]
    msg = str(e.value)
    assert "failed 3 time(s)" in msg and "HTTP 500" in msg and "engine overloaded" in msg
    assert "sampling.base_url" in msg


def test_openai_sampler_timeout(server):
    server.delay_s = 1.0
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16, timeout_s=0.2,
                         max_retries=1, backoff_s=0.01)
    t0 = time.monotonic()
    with pytest.raises(ServerError, match=r"no answer within timeout_s=0.2s"):
        list(OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(1, 1), 1))
    assert time.monotonic() - t0 < 5


def test_openai_sampler_server_down():
    cfg = SamplingConfig(backend="openai", base_url="http://127.0.0.1:9/v1", k=1, max_retries=1, backoff_s=0.01)
    with pytest.raises(ServerError, match="failed 2 time"):
        list(OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(1, 1), 1))


def test_openai_sampler_client_error_is_not_retried(server):
    cfg = SamplingConfig(backend="openai", base_url=server.url, served_model="no-such-model", k=1,
                         max_retries=3, backoff_s=0.01)
    with pytest.raises(ServerError, match="HTTP 404.*no-such-model does not exist"):
        list(OpenAISampler(cfg, EosTok(), progress=False).sample(server_jobs(1, 1), 1))
    assert len(server.completions()) == 1


def test_ensure_adapter_loads_and_samples_from_it(server, tmp_path):
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16)
    sampler = OpenAISampler(cfg, EosTok(), progress=False)
    name = sampler.ensure_adapter(tmp_path / "iter_01" / "adapter")
    assert name.startswith("tpo-") and server.loras[name] == str(tmp_path / "iter_01" / "adapter")
    list(sampler.sample(server_jobs(1, 1), 1))
    assert server.completions()[-1]["model"] == name
    # Again (e.g. after a resume): already listed with the same path, not loaded twice.
    assert sampler.ensure_adapter(tmp_path / "iter_01" / "adapter") == name
    assert sum(p == "/v1/load_lora_adapter" for p, _, _ in server.requests) == 1


def test_ensure_adapter_refusal_is_a_clear_error(server, tmp_path):
    server.lora_ok = False
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16)
    sampler = OpenAISampler(cfg, EosTok(), progress=False)
    with pytest.raises(ServerError) as e:
        sampler.ensure_adapter(tmp_path / "adapter")
    msg = str(e.value)
    assert "could not load the LoRA adapter" in msg and "VLLM_ALLOW_RUNTIME_LORA_UPDATING" in msg
    assert "refusing to sample the base model" in msg
    assert server.completions() == []


def test_ensure_adapter_name_clash_is_refused(server, tmp_path):
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1)
    sampler = OpenAISampler(cfg, EosTok(), progress=False)
    server.loras["mine"] = "/elsewhere/adapter"
    with pytest.raises(ServerError, match="already serves a LoRA named 'mine'"):
        sampler.ensure_adapter(tmp_path / "adapter", name="mine")


def test_openai_budget_forcing_two_phases(server):
    template = get_template("generic")
    tok = EosTok()
    forced = tok(template.forced_response_text)["input_ids"]
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=64, thought_budget=3)
    (_, (s,)), = OpenAISampler(cfg, tok, template, progress=False).sample(server_jobs(1, 1), 1)
    first, second = server.completions()
    assert first["max_tokens"] == 3 and "Here is my response:" in first["stop"]
    thought = [10 + (s.seed + i) % 50 for i in range(3)]
    assert second["prompt"] == [1, 5] + thought + forced
    assert second["max_tokens"] == 64 - 3 - len(forced)
    assert s.forced and s.token_ids[:3 + len(forced)] == thought + forced and s.token_ids[-1] == 2
    assert template.forced_response_text in s.text and s.finish_reason == "eos"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_local_sampler_on_cuda_matches_cpu(tok):
    """Same seeds on the GPU: the uniforms come from the per-sample CPU generators, so with a float32 model the
    sampled ids match the CPU run (a rare boundary case aside, hence >= 7 of 8)."""
    cpu_model = tiny_model(tok)
    gpu_model = tiny_model(tok).cuda()
    cfg = SamplingConfig(k=8, max_new_tokens=12, temperature=1.0, top_p=0.9)
    jobs = [job(tok, "a", "Here is my thought process:", 8)]
    a = collect(LocalSampler(cpu_model, tok, cfg, progress=False), jobs, 8)["a"]
    b = collect(LocalSampler(gpu_model, tok, cfg, progress=False), jobs, 8)["a"]
    assert sum(x.token_ids == y.token_ids for x, y in zip(a, b)) >= 7


# ------------------------------------------------------------- one marker rule for forcing and the parser

# (thought written by the model, then EOS; forced?, parsed response). Response after forcing: "Fine.".
STEP_CASES = [
    ("Okay. Here is my response to the question: 4.", True, "Fine."),  # a partial marker that grows on
    ("ok\nHere is my response", True, "Fine."),  # the model's marker at the very end: only its line end forced
    ('ok "Here is my response:', True, "Fine."),  # quote before, EOS: the line end makes it a use
    ('Write it after "Here is my response:" as told.', True, "Fine."),  # quoted on both sides: a mention
    ("“Here is my response:” is what I write.", True, "Fine."),
    ('He wrote "Here is my response: yes', False, "yes"),  # a quote on one side only: a use
    ("ok\nHere is my response\nYes.", False, "Yes."),  # colon-less marker then newline: a use
    ("ok\n## Here is my response\nYes.", False, "Yes."),
    ("ok\n**Here is my response:**\nYes.", False, "Yes."),
    ("Fine. Here's my response: yes", False, "yes"),
    ("fine, here is my response: yes", False, "yes"),
    ("ok Here is my" + " \n" * 30 + "response: yes", False, "yes"),  # a marker longer than any fixed window
]


def drive_step(sampler, tok, thought, response="Fine."):
    """Feed `thought` token by token to the sampler's per-token step, then EOS, then `response` and EOS."""
    from tpo_lite.sampling import _Row

    eos = tok.eos_token_id
    row = _Row(0, 0, sampler.forcing is not None)
    for t in tok(thought, add_special_tokens=False)["input_ids"]:
        sampler._step(row, t)
        assert row.finish is None
    sampler._step(row, eos)
    while row.pending:
        sampler._step(row, eos)  # forced tokens are fed whatever was sampled
    if row.finish is None:
        for t in tok(response, add_special_tokens=False)["input_ids"] + [eos]:
            sampler._step(row, t)
    return row


@pytest.mark.parametrize("thought,forced,response", STEP_CASES)
def test_forcing_and_parser_agree_on_the_marker(tok, model, thought, forced, response):
    from tpo_lite.parsing import parse_output, response_marker_uses

    template = get_template("generic")
    cfg = SamplingConfig(k=1, max_new_tokens=400, thought_budget=300)
    row = drive_step(LocalSampler(model, tok, cfg, template, progress=False), tok, thought)
    text = tok.decode(row.ids, skip_special_tokens=True)
    r = parse_output(text, template, row.finish)
    assert (row.finish, row.forced) == ("eos", forced), text
    assert r.valid and r.response == response, text
    assert len(response_marker_uses(text, template)) == 1, text  # forcing never adds a second marker


class PhraseSampler(LocalSampler):
    """The local sampler with the sampled token replaced by tricky marker fragments, drawn per sample from
    its own seed (the loop, KV cache, batching and forcing run as usual; only the choice is scripted)."""

    PHRASES = ["Here is my response", "Here's my response", " here is my response", "Here is my response:", ":",
               '"', "\n", " to you", "**", " ok", "## ", None]  # None = EOS

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.queues, self.flips = {}, {}

    def _step(self, row, sampled):
        import random

        key = (row.seed, row.index)
        if not row.pending and row.finish is None:
            rng, queue = self.queues.setdefault(key, (random.Random(row.seed), []))
            if not queue:
                phrase = rng.choice(self.PHRASES)
                queue.extend([self.tokenizer.eos_token_id] if phrase is None
                             else self.tokenizer(phrase, add_special_tokens=False)["input_ids"])
            sampled = queue.pop(0)
        thinking = row.thinking
        tok = super()._step(row, sampled)
        if thinking and not row.thinking and not row.forced:  # the model's own marker ended the thought
            self.flips[key] = (False, len(row.ids))
        return tok

    def _end_thought(self, row, text=None):
        self.flips[(row.seed, row.index)] = (True, len(row.ids))  # the thought's tokens, before the forced ones
        super()._end_thought(row, text)


def test_budget_forced_run_always_parses_with_one_marker(tok, model):
    """Random outputs full of partial, quoted and markdown markers: every output not cut by the token limit
    has a response marker, and the parser splits at the marker the sampler saw or forced (never a second one)."""
    from tpo_lite.parsing import parse_output, response_marker_uses

    template = get_template("generic")
    cfg = SamplingConfig(k=12, batch_size=12, max_new_tokens=50, thought_budget=20, temperature=0.0)
    sampler = PhraseSampler(model, tok, cfg, template, progress=False)
    out = collect(sampler, [job(tok, f"p{i}", "Here", 12) for i in range(3)], 12)
    n_forced = n_own = 0
    for samples in out.values():
        for s in samples:
            if s.finish_reason == "length":
                continue
            r = parse_output(s.text, template, s.finish_reason)
            assert r.invalid_reason != "no_response_marker", s.text
            forced, thought_len = sampler.flips[(s.seed, s.index)]
            assert forced == s.forced
            thought = tok.decode(s.token_ids[:thought_len], skip_special_tokens=True)
            first = response_marker_uses(s.text, template)[0]
            if forced:  # the marker is the forced one, or the model's own that ended the thought
                n_forced += 1
                assert not response_marker_uses(thought, template, final=False), s.text
                assert first.start() == len(thought) + 2 or first.end() == len(thought), s.text
            else:  # the marker the sampler saw while streaming
                n_own += 1
                assert first.start() == response_marker_uses(thought, template, final=False)[0].start(), s.text
    assert n_forced >= 5 and n_own >= 3, (n_forced, n_own)


# ---------------------------------------------------------------------------------------- response budget

class NoEos:
    """Forward hook on lm_head that makes EOS impossible (every output runs to its token limit)."""

    def __init__(self, model, eos):
        self.eos = eos
        self.handle = model.lm_head.register_forward_hook(self)

    def __call__(self, module, inputs, output):
        out = output.clone()
        out[..., self.eos] -= 1e4
        return out

    def remove(self):
        self.handle.remove()


def _marker_tokens(tok, ids, template):
    """Tokens up to and including the first response marker of the finished output (None: no marker)."""
    from tpo_lite.parsing import response_marker_uses

    uses = response_marker_uses(tok.decode(ids, skip_special_tokens=True), template)
    if not uses:
        return None
    return next(n for n in range(len(ids) + 1) if len(tok.decode(ids[:n], skip_special_tokens=True)) >= uses[0].end())


def test_response_budget_after_a_thought_that_used_the_whole_budget(tok, model):
    template = get_template("generic")
    forced = tok(template.forced_response_text, add_special_tokens=False)["input_ids"]
    B, R = 6, 9
    # max_new_tokens alone would leave the response 1 - len(forced) tokens: the budget gives it R.
    cfg = SamplingConfig(k=4, max_new_tokens=B + 1, thought_budget=B, response_budget=R)
    hook = NoEos(model, tok.eos_token_id)
    try:
        out = collect(LocalSampler(model, tok, cfg, template, progress=False), [job(tok, "p", "Here", 4)], 4)
    finally:
        hook.remove()
    for s in out["p"]:
        assert s.forced and s.finish_reason == "length"
        assert s.token_ids[B:B + len(forced)] == forced
        assert len(s.token_ids) == B + len(forced) + R  # the whole response budget, not max_new_tokens


@pytest.mark.parametrize("thought_budget", [12, None])
def test_response_budget_bounds_every_response(tok, model, thought_budget):
    """Markers written by the model (partial, quoted, markdown) or forced: the response after the first
    marker never gets more than R tokens, the output never more than B + len(marker) + R (with forcing) or
    max_new_tokens before a marker; a forced output cut by the budget got exactly R."""
    template = get_template("generic")
    forced = tok(template.forced_response_text, add_special_tokens=False)["input_ids"]
    R, M = 7, 30
    cfg = SamplingConfig(k=12, batch_size=12, max_new_tokens=M, thought_budget=thought_budget, response_budget=R,
                         temperature=0.0)
    sampler = PhraseSampler(model, tok, cfg, template, progress=False)
    out = collect(sampler, [job(tok, f"p{i}", "Here", 12) for i in range(3)], 12)
    cut = 0
    for samples in out.values():
        for s in samples:
            if s.forced:  # the marker is the forced text (or the line end that completed the model's own)
                thought_len = sampler.flips[(s.seed, s.index)][1]
                n = thought_len + (len(forced) if s.token_ids[thought_len:thought_len + len(forced)] == forced
                                   else len(tok("\n", add_special_tokens=False)["input_ids"]))
            else:
                n = _marker_tokens(tok, s.token_ids, template)
            if thought_budget is not None:
                assert len(s.token_ids) <= thought_budget + len(forced) + R
            if n is None:  # no marker: only possible without forcing, cut by max_new_tokens or EOS
                assert thought_budget is None and len(s.token_ids) <= M
                continue
            response = len(s.token_ids) - n
            assert response <= R, s.text
            if s.finish_reason == "length" and s.forced:  # cut by the budget after exactly R tokens
                assert response == R, s.text
                cut += 1
    assert cut >= (3 if thought_budget else 0)
    if thought_budget is None:  # a late marker still gets R response tokens, past max_new_tokens
        assert max(len(s.token_ids) for samples in out.values() for s in samples) > M


def test_response_budget_direct_template_bounds_the_whole_output(tok, model):
    cfg = SamplingConfig(k=2, max_new_tokens=40, response_budget=5)
    hook = NoEos(model, tok.eos_token_id)
    try:
        sampler = LocalSampler(model, tok, cfg, get_template("direct"), progress=False)
        out = collect(sampler, [job(tok, "p", "Here", 2)], 2)
    finally:
        hook.remove()
    assert [(len(s.token_ids), s.finish_reason) for s in out["p"]] == [(5, "length")] * 2


def test_response_budget_config():
    with pytest.raises(TpoError) as e:
        SamplingConfig(response_budget=0)
    assert e.value.field == "response_budget"


# ------------------------------------------------------------------------------- server: EOS, marker stops

def scripted(text, finish="stop", stop_reason=None, eos=None):
    """A canned completion choice whose token ids are EosTok's tokenisation of `text` (+ an end token)."""
    ids = EosTok()(text)["input_ids"] + ([eos] if eos is not None else [])
    return {"text": text, "token_ids": ids, "finish_reason": finish, "stop_reason": stop_reason}


class GenTok(EosTok):
    """EosTok loaded "from" a model directory (where a generation config may be saved)."""

    def __init__(self, path):
        self.name_or_path = str(path)


def test_openai_sampler_no_second_eos_after_the_models_end_of_turn(server, tmp_path):
    from transformers import GenerationConfig

    eot = 7  # Llama-3's <|eot_id|>; the tokenizer's EOS (2) plays <|end_of_text|>
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16, concurrency=1)
    # The EOS set comes from the generation config saved with the model (where the tokenizer came from).
    GenerationConfig(eos_token_id=[2, eot]).save_pretrained(tmp_path)
    server.script = [scripted("hi", eos=eot), scripted("yo", stop_reason=eot)]  # 2nd: the server left it out
    out = [s for _, (s,) in OpenAISampler(cfg, GenTok(tmp_path), progress=False).sample(server_jobs(2, 1), 1)]
    assert sorted(s.token_ids for s in out) == sorted([EosTok()("hi")["input_ids"] + [eot],
                                                       EosTok()("yo")["input_ids"] + [eot]])
    assert all(s.finish_reason == "eos" for s in out)
    # Or from the caller.
    server.script = [scripted("hi", eos=eot)]
    sampler = OpenAISampler(cfg, EosTok(), progress=False, eos_ids={2, eot})
    assert sampler.eos_ids == {2, eot}
    (_, (s,)), = sampler.sample(server_jobs(1, 1), 1)
    assert s.token_ids == EosTok()("hi")["input_ids"] + [eot]
    # Ended on a stop string: nothing appended.
    server.script = [scripted("a<12>", stop_reason="<12>")]
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=16, stop=["<12>"])
    (_, (s,)), = OpenAISampler(cfg, GenTok(tmp_path), progress=False).sample(server_jobs(1, 1), 1)
    assert s.token_ids == EosTok()("a<12>")["input_ids"] and s.finish_reason == "stop"


def test_openai_quoted_marker_stop_continues_the_thought(server):
    from tpo_lite.parsing import parse_output

    template = get_template("generic")
    marker = "Here is my response:"
    t1, t2 = 'I will answer after "Here is my response:', '" as asked. Here is my response:'
    server.script = [scripted(t1, stop_reason=marker), scripted(t2, stop_reason=marker), scripted(" Hi.", eos=2)]
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=200, thought_budget=100)
    (_, (s,)), = OpenAISampler(cfg, EosTok(), template, progress=False).sample(server_jobs(1, 1), 1)
    first, second, third = server.completions()
    n1, n2 = len(t1), len(t2)  # EosTok: one token per character
    # The quoted stop is a mention: the thought goes on from there, within what is left of its budget.
    assert second["prompt"] == [1, 5] + EosTok()(t1)["input_ids"] and second["max_tokens"] == 100 - n1
    assert marker in second["stop"]
    # The real marker ends the thought: the response, nothing forced.
    assert third["max_tokens"] == 200 - n1 - n2 and not third["stop"]
    assert not s.forced and s.finish_reason == "eos" and s.text == t1 + t2 + " Hi."
    r = parse_output(s.text, template, s.finish_reason)
    assert r.valid and r.response == "Hi." and r.thought == 'I will answer after "Here is my response:" as asked.'


def test_openai_mention_then_budget_forces_the_marker(server):
    template = get_template("generic")
    marker = "Here is my response:"
    t1, t2 = 'Write after "Here is my response:', '" ok'
    server.script = [scripted(t1, stop_reason=marker), scripted(t2, finish="length"), scripted("Hi.", eos=2)]
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=200, thought_budget=len(t1) + 4)
    (_, (s,)), = OpenAISampler(cfg, EosTok(), template, progress=False).sample(server_jobs(1, 1), 1)
    assert s.forced and s.text == t1 + t2 + template.forced_response_text + "Hi."
    assert len(server.completions()) == 3 and server.completions()[1]["max_tokens"] == 4


def test_openai_response_budget(server):
    template = get_template("generic")
    tok = EosTok()
    forced = tok(template.forced_response_text)["input_ids"]
    # Forced: the response request gets response_budget tokens, whatever max_new_tokens leaves.
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=8, thought_budget=3,
                         response_budget=11)
    (_, (s,)), = OpenAISampler(cfg, tok, template, progress=False).sample(server_jobs(1, 1), 1)
    first, second = server.completions()
    assert first["max_tokens"] == 3 and second["max_tokens"] == 11 and s.forced
    assert len(s.token_ids) == 3 + len(forced) + 4  # fake server: 3 tokens + EOS
    # No forcing: the first request stops at the model's marker, the second gets response_budget tokens.
    server.requests.clear()
    t1 = "ok Here is my response:"
    server.script = [scripted(t1, stop_reason="Here is my response:")]
    cfg = SamplingConfig(backend="openai", base_url=server.url, k=1, max_new_tokens=64, response_budget=5)
    (_, (s,)), = OpenAISampler(cfg, tok, template, progress=False).sample(server_jobs(1, 1), 1)
    first, second = server.completions()
    assert first["max_tokens"] == 64 and "Here is my response:" in first["stop"]
    assert second["max_tokens"] == 5 and not second["stop"] and not s.forced
    assert s.text.startswith(t1) and s.finish_reason == "eos"
