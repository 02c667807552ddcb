"""DPO training on a tiny random Llama built in the test: loss goes down, margins start at 0, caches, resume."""
import json
import math
import warnings

import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.models import ModelConfig
from tpo_lite.train import (TrainConfig, collate, lr_lambda, prepare_pairs, train_iteration, truncate)

from tiny_models import VOCAB  # noqa: E402  (tests/ is on sys.path under pytest)


def synthetic_pairs(n, seed=0, prompt_len=(3, 8), comp_len=(2, 10)):
    """Pairs whose chosen outputs use low token ids and rejected ones high ids: a learnable preference."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        lp = int(torch.randint(*prompt_len, (1,), generator=g))
        prompt = torch.randint(3, VOCAB, (lp,), generator=g).tolist()
        lc, lr = (int(torch.randint(*comp_len, (1,), generator=g)) for _ in range(2))
        chosen = torch.randint(3, 50, (lc,), generator=g).tolist() + [2]
        rejected = torch.randint(200, VOCAB, (lr,), generator=g).tolist() + [2]
        pairs.append({"prompt_id": f"p{i:03d}", "prompt_token_ids": prompt, "chosen_token_ids": chosen,
                      "rejected_token_ids": rejected, "chosen_index": 0, "rejected_index": 1})
    return pairs


def model_cfg(path, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("load_in_4bit", False)
    kw.setdefault("device", "cpu")
    return ModelConfig(path=path, lora_r=8, lora_alpha=16, lora_dropout=0.0, **kw)


def test_truncate_rule():
    p, c = list(range(10)), list(range(100, 120))
    assert truncate(p, c, 64) == (p, c)
    tp, tc = truncate(p, c, 16)  # completion keeps max(16-10, 8) = 8, prompt its last 8
    assert tc == c[:8] and tp == p[-8:] and len(tp) + len(tc) == 16
    tp, tc = truncate(p, c[:3], 8)  # short completion kept whole, prompt cut from the left
    assert tc == c[:3] and tp == p[-5:]


def test_collate_rows_score_the_completion_tokens():
    seqs = [([5, 6, 7], [8, 9]), ([5], [10, 11, 12])]
    b = collate(seqs, 0, "cpu")
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [5, 10, 11, 12, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    # position p predicts token p+1: sequence 0 scores 8 from position 2 and 9 from 3; sequence 1 (offset 5)
    # scores 10, 11, 12 from positions 0, 1, 2
    assert b["rows"].tolist() == [2, 3, 5, 6, 7]
    assert b["targets"].tolist() == [8, 9, 10, 11, 12]
    assert b["segments"].tolist() == [0, 0, 1, 1, 1]


def test_lr_schedules():
    f = lr_lambda("cosine", warmup=2, total=10)
    assert [round(f(s), 6) for s in (0, 1)] == [round(1 / 3, 6), round(2 / 3, 6)]
    assert f(2) == pytest.approx(1.0) and f(6) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    lin = lr_lambda("linear", warmup=0, total=4)
    assert [lin(s) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert lr_lambda("constant", 1, 5)(4) == 1.0


def test_bad_pairs_name_record_and_field():
    good = synthetic_pairs(2)
    bad = [good[0], dict(good[1], chosen_token_ids=[])]
    with pytest.raises(TpoError, match=r"pairs\[1\]\.chosen_token_ids: expected a non-empty list"):
        prepare_pairs(bad, 64, VOCAB, source="pairs.jsonl")
    bad = [good[0], dict(good[1], rejected_token_ids=[5, VOCAB])]
    with pytest.raises(TpoError, match=r"pairs.jsonl: pairs\[1\]\.rejected_token_ids: token id 300"):
        prepare_pairs(bad, 64, VOCAB, source="pairs.jsonl")
    with pytest.raises(TpoError, match="duplicate pair 'p000'"):
        prepare_pairs([good[0], good[0]], 64, VOCAB)


def test_bad_train_config():
    with pytest.raises(TpoError, match="label_smoothing: must be 0 for loss_type 'ipo'"):
        TrainConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(TpoError, match="batch_size: must be >= 1"):
        TrainConfig(batch_size=0)


def _reference_sequence_logps(model_dir, pairs):
    """Plain float64 log-probs of chosen / rejected with the untouched base model and full logits."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = {}
    with torch.no_grad():
        for p in pairs:
            vals = []
            for comp in (p["chosen_token_ids"], p["rejected_token_ids"]):
                ids = torch.tensor([p["prompt_token_ids"] + comp])
                logp = torch.log_softmax(m(ids).logits[0], -1)
                n = len(p["prompt_token_ids"])
                vals.append(sum(logp[n - 1 + j, t].item() for j, t in enumerate(comp)))
            out[p["prompt_id"]] = vals
    return out


def test_train_iteration_learns_and_resumes(tiny_dir, tmp_path):
    pairs = synthetic_pairs(16)
    tcfg = TrainConfig(learning_rate=5e-3, epochs=4, batch_size=2, grad_accum=2, warmup_ratio=0.0,
                       lr_schedule="constant", beta=0.5, max_length=64)
    out = tmp_path / "iter_01"
    metrics = train_iteration(model_cfg(tiny_dir), tcfg, pairs, out, None, progress=False)

    # reference = base model: cached values match a float64 full-logits computation
    cache = torch.load(out / "ref_logps.pt", weights_only=True)
    expected = _reference_sequence_logps(tiny_dir, pairs)
    assert set(cache["logps"]) == {p["prompt_id"] for p in pairs}
    for pid, (c, r) in cache["logps"].items():
        assert c == pytest.approx(expected[pid][0], rel=1e-5)
        assert r == pytest.approx(expected[pid][1], rel=1e-5)

    # policy = reference before the first update: margins 0 and loss log 2
    assert abs(metrics["initial_margin"]) < 1e-5
    assert metrics["initial_loss"] == pytest.approx(math.log(2), abs=1e-5)
    history = json.loads((out / "adapter" / "history.json").read_text())
    assert metrics["steps"] == len(history) == 4 * math.ceil(16 / 4)
    first_epoch = sum(h["loss"] for h in history[:4]) / 4
    assert metrics["loss"] < first_epoch - 0.05, (first_epoch, metrics["loss"])
    assert metrics["final_loss"] < math.log(2) - 0.1
    assert metrics["margins"] > 0.1 and metrics["accuracy"] > 0.7
    assert metrics["tokens"] == 4 * sum(len(p["chosen_token_ids"]) + len(p["rejected_token_ids"]) for p in pairs)
    assert (out / "adapter" / "adapter_config.json").is_file()

    # DONE marker: a second call returns the stored metrics without training
    again = train_iteration(model_cfg(tiny_dir), tcfg, pairs, out, None, progress=False)
    assert again == json.loads((out / "adapter" / "DONE").read_text())
    assert again["seconds"] == metrics["seconds"]

    # the trained adapter prefers the chosen outputs: its log-ratio margin agrees with the training metrics
    from tpo_lite.models import load_model
    from tpo_lite.train import LMHead, completion_logps

    m, _ = load_model(model_cfg(tiny_dir), adapter=out / "adapter")
    head = LMHead.of(m)
    with torch.no_grad():
        seqs = [(p["prompt_token_ids"], p["chosen_token_ids"]) for p in pairs] + \
               [(p["prompt_token_ids"], p["rejected_token_ids"]) for p in pairs]
        lp = completion_logps(m, seqs, 0, head)
    ref_c = torch.tensor([cache["logps"][p["prompt_id"]][0] for p in pairs])
    ref_r = torch.tensor([cache["logps"][p["prompt_id"]][1] for p in pairs])
    margins = 0.5 * ((lp[:16] - ref_c) - (lp[16:] - ref_r))
    assert margins.mean() > 0.1 and (margins > 0).float().mean() > 0.7


def test_second_iteration_uses_the_loaded_adapter_as_reference(tiny_dir, tmp_path):
    tcfg = TrainConfig(learning_rate=5e-3, epochs=1, batch_size=4, grad_accum=1, max_length=64, beta=0.5)
    it1 = tmp_path / "iter_01"
    train_iteration(model_cfg(tiny_dir), tcfg, synthetic_pairs(8, seed=1), it1, None, progress=False)
    it2 = tmp_path / "iter_02"
    pairs2 = synthetic_pairs(8, seed=2)
    m2 = train_iteration(model_cfg(tiny_dir), tcfg, pairs2, it2, it1 / "adapter", progress=False)
    # with the iteration-1 adapter as both reference and starting policy, margins start at 0 again
    assert abs(m2["initial_margin"]) < 1e-5
    base = _reference_sequence_logps(tiny_dir, pairs2)
    cache = torch.load(it2 / "ref_logps.pt", weights_only=True)["logps"]
    # ... and the reference is not the base model any more
    assert max(abs(cache[k][0] - base[k][0]) for k in base) > 1e-3


def test_reference_cache_is_reused(tiny_dir, tmp_path, monkeypatch):
    import tpo_lite.train as train_mod

    tcfg = TrainConfig(epochs=1, batch_size=2, grad_accum=1, max_length=64)
    out = tmp_path / "it"
    pairs = synthetic_pairs(4, seed=3)
    train_iteration(model_cfg(tiny_dir), tcfg, pairs, out, None, progress=False)
    saved = torch.load(out / "ref_logps.pt", weights_only=True)

    # A crash after the reference pass: no DONE, the cache stays. The rerun must not recompute it; plant a
    # recognisable value to prove the cached one is what training uses.
    import shutil
    shutil.rmtree(out / "adapter")
    saved["logps"]["p000"] = [saved["logps"]["p000"][0] + 10.0, saved["logps"]["p000"][1]]
    torch.save(saved, out / "ref_logps.pt")
    calls = []
    real = train_mod.reference_logps
    monkeypatch.setattr(train_mod, "reference_logps", lambda *a, **k: calls.append(a) or real(*a, **k))
    m = train_iteration(model_cfg(tiny_dir), tcfg, pairs, out, None, progress=False)
    assert calls == [] and m["ref_cached"] is True
    assert m["initial_margin"] != pytest.approx(0.0, abs=1e-3)  # the planted +10 on one chosen reference

    # a new pair: only it is computed; a changed max_length invalidates the whole cache
    shutil.rmtree(out / "adapter")
    more = pairs + synthetic_pairs(5, seed=4)[4:]
    more[-1]["prompt_id"] = "new"
    m = train_iteration(model_cfg(tiny_dir), tcfg, more, out, None, progress=False)
    assert len(calls) == 1 and [p.pid for p in calls[0][1]] == ["new"] and m["ref_cached"] is False
    shutil.rmtree(out / "adapter")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        train_iteration(model_cfg(tiny_dir), TrainConfig(epochs=1, batch_size=2, grad_accum=1, max_length=32),
                        more, out, None, progress=False)
    assert len(calls) == 2 and len(calls[1][1]) == 5
    assert any("other settings" in str(x.message) for x in w)


@pytest.mark.parametrize("loss_type,extra", [("ipo", {}), ("robust", {"label_smoothing": 0.1}),
                                             ("hinge", {}), ("sigmoid", {"nll_weight": 0.5})])
def test_other_losses_train(tiny_dir, tmp_path, loss_type, extra):
    tcfg = TrainConfig(learning_rate=5e-3, epochs=3, batch_size=4, grad_accum=1, loss_type=loss_type,
                       max_length=64, lr_schedule="constant", warmup_ratio=0.0, beta=0.5, **extra)
    m = train_iteration(model_cfg(tiny_dir), tcfg, synthetic_pairs(8, seed=5), tmp_path / loss_type, None,
                        progress=False)
    assert abs(m["initial_margin"]) < 1e-5
    assert m["final_margins"] > m["initial_margin"] + 0.05


def test_grad_checkpointing_gives_the_same_update(tiny_dir, tmp_path):
    kw = dict(learning_rate=1e-2, epochs=1, batch_size=2, grad_accum=2, max_length=64, seed=7)
    pairs = synthetic_pairs(8, seed=6)
    a = train_iteration(model_cfg(tiny_dir), TrainConfig(grad_checkpointing=False, **kw), pairs, tmp_path / "a",
                        None, progress=False)
    b = train_iteration(model_cfg(tiny_dir), TrainConfig(grad_checkpointing=True, **kw), pairs, tmp_path / "b",
                        None, progress=False)
    assert (a["grad_checkpointing"], b["grad_checkpointing"]) == (False, True)
    assert a["final_loss"] == pytest.approx(b["final_loss"], rel=1e-5)
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_grad_accum_equals_big_batch(tiny_dir, tmp_path):
    """4 pairs as 1x4 or as 2 micro-batches of 2 give the same optimizer step (the same adapter)."""
    pairs = synthetic_pairs(4, seed=8)
    kw = dict(learning_rate=1e-2, epochs=1, max_length=64, seed=3, max_grad_norm=0.0)
    train_iteration(model_cfg(tiny_dir), TrainConfig(batch_size=4, grad_accum=1, **kw), pairs, tmp_path / "a",
                    None, progress=False)
    train_iteration(model_cfg(tiny_dir), TrainConfig(batch_size=2, grad_accum=2, **kw), pairs, tmp_path / "b",
                    None, progress=False)
    from safetensors.torch import load_file
    wa = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


def test_nf4_qlora_trains_on_cpu(tiny_dir, tmp_path):
    pytest.importorskip("bitsandbytes")
    tcfg = TrainConfig(learning_rate=5e-3, epochs=3, batch_size=4, grad_accum=1, max_length=64,
                       lr_schedule="constant", warmup_ratio=0.0, beta=0.5)
    m = train_iteration(model_cfg(tiny_dir, load_in_4bit=True, dtype="bfloat16"), tcfg, synthetic_pairs(8, seed=9),
                        tmp_path / "nf4", None, progress=False)
    assert m["model"]["nf4"] is True
    # bf16 compute: reference and first step run the same op in the same precision
    assert abs(m["initial_margin"]) < 1e-3
    assert m["final_margins"] > 0.05 and m["final_loss"] < math.log(2)


def test_empty_pairs_and_bad_adapter(tiny_dir, tmp_path):
    with pytest.raises(TpoError, match="no pairs"):
        train_iteration(model_cfg(tiny_dir), TrainConfig(), [], tmp_path / "x", None, progress=False)
    with pytest.raises(TpoError, match="not a peft adapter"):
        train_iteration(model_cfg(tiny_dir), TrainConfig(), synthetic_pairs(2), tmp_path / "x", tmp_path,
                        progress=False)


def test_disable_dropout_makes_policy_equal_reference(tiny_dir, tmp_path):
    """An adapter trained with LoRA dropout carries it (adapter_config.json) into the next iteration: with
    disable_dropout (the default) the policy pass equals the cached reference pass exactly; without it the
    dropout makes the first margin non-zero."""
    mcfg = ModelConfig(path=tiny_dir, dtype="float32", load_in_4bit=False, device="cpu", lora_r=8,
                       lora_alpha=16, lora_dropout=0.2)
    tcfg = TrainConfig(learning_rate=5e-3, epochs=1, batch_size=4, grad_accum=1, max_length=64, beta=0.5)
    assert tcfg.disable_dropout
    it1 = tmp_path / "iter_01"
    train_iteration(mcfg, tcfg, synthetic_pairs(8, seed=1), it1, None, progress=False)
    assert json.loads((it1 / "adapter" / "adapter_config.json").read_text())["lora_dropout"] == 0.2
    pairs2 = synthetic_pairs(8, seed=2)
    on = train_iteration(mcfg, tcfg, pairs2, tmp_path / "on", it1 / "adapter", progress=False)
    assert on["initial_margin"] == 0.0 and on["dropouts_zeroed"] > 0
    off = train_iteration(mcfg, TrainConfig(**{**tcfg.__dict__, "disable_dropout": False}), pairs2,
                          tmp_path / "off", it1 / "adapter", progress=False)
    assert off["initial_margin"] != 0.0 and off["dropouts_zeroed"] == 0


# ------------------------------------------------------------------------------------------ activation memory

def _saved_bytes(model, batch, weight, skip=frozenset()):
    """Bytes autograd keeps for the backward of one DPO micro-batch (distinct storages, those in ``skip`` not
    counted)."""
    from tpo_lite.ops import fused_dpo_loss
    from tpo_lite.train import _scored_hidden

    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fused_dpo_loss(_scored_hidden(model, batch), weight, batch["targets"], batch["segments"],
                             torch.zeros(4))
    return sum(kept.values()), out


def _cfg_dropout(path, dtype, lora_dropout):
    return ModelConfig(path=path, dtype=dtype, load_in_4bit=False, device="cpu", lora_r=8, lora_alpha=16,
                       lora_dropout=lora_dropout)


def test_bf16_lora_keeps_bf16_inputs_with_the_same_gradients(tiny_dir):
    """peft casts every LoRA input of a bf16 model to fp32 and autograd kept those copies (half of the DPO
    backward's memory on SmolLM2); compact_lora_activations keeps the bf16 input instead: same loss, same
    LoRA gradients, less kept."""
    from tpo_lite.models import compact_lora_activations, lm_head_weight, load_model
    from tpo_lite.train import disable_dropout

    pairs = synthetic_pairs(2, seed=4, prompt_len=(20, 30), comp_len=(30, 60))
    seqs = [(p["prompt_token_ids"], p["chosen_token_ids"]) for p in pairs] + \
           [(p["prompt_token_ids"], p["rejected_token_ids"]) for p in pairs]
    batch = collate(seqs, 0, "cpu")
    results = []
    for compact in (False, True):
        torch.manual_seed(0)
        model, _ = load_model(_cfg_dropout(tiny_dir, "bfloat16", 0.1), trainable=True)
        disable_dropout(model)
        for name, p in model.named_parameters():  # a non-zero adapter, so every LoRA path carries gradient
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(len(name)))
        n = compact_lora_activations(model) if compact else 0
        kept, out = _saved_bytes(model, batch, lm_head_weight(model))
        out.loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((n, kept, out.loss.detach().item(), grads))
    (_, kept_before, loss_before, g_before), (n, kept_after, loss_after, g_after) = results
    assert n == 2 * 7  # every adapted linear of the 2 layers (q, k, v, o, gate, up, down)
    assert loss_after == loss_before
    assert g_after.keys() == g_before.keys() and len(g_after) == 2 * 7 * 2
    for k in g_before:
        torch.testing.assert_close(g_after[k], g_before[k], rtol=1e-5, atol=1e-7)
    assert kept_after < 0.75 * kept_before, (kept_after, kept_before)


def test_compaction_leaves_fp32_and_active_dropout_alone(tiny_dir):
    from tpo_lite.models import compact_lora_activations, load_model

    fp32, _ = load_model(model_cfg(tiny_dir), trainable=True)
    assert compact_lora_activations(fp32) == 14  # patched, but a no-op: input and weight share the dtype
    dropping, _ = load_model(_cfg_dropout(tiny_dir, "bfloat16", 0.1), trainable=True)
    # dropout would run on the bf16 input instead of the fp32 copy: left to peft
    assert compact_lora_activations(dropping) == 0


def test_grad_checkpointing_is_the_default_and_keeps_less(tiny_dir):
    """On by default: the DPO backward then keeps about one decoder layer's activations instead of all."""
    from tpo_lite.models import enable_gradient_checkpointing, lm_head_weight, load_model

    assert TrainConfig().grad_checkpointing is True
    pairs = synthetic_pairs(2, seed=4, prompt_len=(20, 30), comp_len=(30, 60))
    batch = collate([(p["prompt_token_ids"], p["chosen_token_ids"]) for p in pairs]
                    + [(p["prompt_token_ids"], p["rejected_token_ids"]) for p in pairs], 0, "cpu")
    kept = []
    for gc_on in (False, True):
        model, _ = load_model(model_cfg(tiny_dir), trainable=True)
        if gc_on:
            enable_gradient_checkpointing(model)
        kept.append(_saved_bytes(model, batch, lm_head_weight(model))[0])
    assert kept[1] < 0.5 * kept[0], kept


def test_train_metrics_record_memory_by_phase(tiny_dir, tmp_path):
    m = train_iteration(model_cfg(tiny_dir), TrainConfig(epochs=1, batch_size=2, grad_accum=1, max_length=64),
                        synthetic_pairs(4, seed=2), tmp_path / "it", None, progress=False)
    assert set(m["memory"]) == {"load", "reference", "dpo"}
    for phase, rec in m["memory"].items():
        assert 0 < rec["rss_start_mb"] <= rec["peak_rss_mb"], (phase, rec)
        assert rec["method"]


def test_reference_pass_runs_with_the_trim_hooks(tiny_dir, tmp_path, monkeypatch):
    """On the CPU the no-grad reference pass keeps glibc's freed activation pages like the DPO pass does (SmolLM2,
    adapter of iteration 1: it ended ~120 MB higher without the hooks), so it runs with them too."""
    from tpo_lite import memory, train

    installed, seen = [], []
    real_install, real_reference = memory.trim_during_passes, train.reference_logps

    def install(layers, every=5):
        handles = real_install(layers, every)
        installed.append(handles)
        return handles

    def reference(*a, **k):
        seen.append(len(installed))
        return real_reference(*a, **k)

    monkeypatch.setattr(memory, "trim_during_passes", install)
    monkeypatch.setattr(train, "reference_logps", reference)
    tcfg = TrainConfig(epochs=1, batch_size=2, grad_accum=1, max_length=64)
    train_iteration(model_cfg(tiny_dir), tcfg, synthetic_pairs(4), tmp_path / "iter_01", None, progress=False)
    assert seen == [1] and len(installed) == 1  # installed once, before the reference pass, for both passes


# ------------------------------------------------------------------------------------------ shared-prompt layout

def _pair_items(seed, n=3, max_length=64):
    return prepare_pairs(synthetic_pairs(n, seed=seed, prompt_len=(4, 12), comp_len=(1, 14)), max_length, VOCAB)


def test_collate_shared_layout_by_hand():
    from tpo_lite.train import _Pair, collate_shared

    pairs = [_Pair("a", ([5, 6], [7, 8]), ([5, 6], [9])), _Pair("b", ([4], [10]), ([3], [11, 12]))]
    b = collate_shared(pairs, 0, "cpu")
    # row 0: prompt 5 6, chosen 7 8, rejected 9 (positions continue from the prompt); row 1 shares nothing
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 10, 3, 11, 12]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 3, 2], [0, 1, 0, 1, 2]]
    m = b["attention_mask"].int().tolist()
    assert m[0][4] == [1, 1, 0, 0, 1]  # the rejected token sees the prompt and itself, not the chosen tokens
    assert m[1][2] == [0, 0, 1, 0, 0] and m[1][4] == [0, 0, 1, 1, 1]  # a whole second sequence sees only itself
    assert m[0][2] == [1, 1, 1, 0, 0]  # the chosen tokens are causal as usual
    # chosen 7, 8 from positions 1, 2 (row 0) and 10 from 5 (row 1); rejected 9 from the prompt's last position 1,
    # 11 and 12 from positions 7 and 8 (row 1 at offset 5: its rejected sequence 3 11 12 starts at 2)
    assert b["rows"].tolist() == [1, 2, 5, 1, 7, 8]
    assert b["targets"].tolist() == [7, 8, 10, 9, 11, 12]
    assert b["segments"].tolist() == [0, 0, 1, 2, 3, 3]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_gives_the_padded_log_probs_and_gradients(tiny_dir, attn):
    """float64: the completion log-probs and the DPO loss's LoRA gradients of one row per pair equal those of
    two padded sequences per pair, pairs of different lengths and one whose prompts were cut differently."""
    from tpo_lite.models import load_model
    from tpo_lite.ops import fused_dpo_loss, fused_linear_logprobs
    from tpo_lite.ops.dpo import segment_sums
    from tpo_lite.train import LMHead, _Pair, _scored_hidden, collate_pairs

    model, _ = load_model(model_cfg(tiny_dir), trainable=True)
    model.double()
    model.config._attn_implementation = attn
    for name, p in model.named_parameters():  # a non-zero adapter, so its gradients are not all zero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(len(name)))
    items = _pair_items(7) + [_Pair("cut", ([8, 9, 10], [11, 12]), ([9, 10], [13, 14, 15]))]
    head = LMHead.of(model)
    ref = torch.linspace(-30, -10, 2 * len(items), dtype=torch.float64)
    results = []
    for shared in (False, True):
        model.zero_grad()
        batch = collate_pairs(items, 0, "cpu", share_prompt=shared)
        hidden = _scored_hidden(model, batch)
        logps, _ = segment_sums(fused_linear_logprobs(hidden.detach(), head.weight.detach(), batch["targets"]),
                                batch["segments"], 2 * len(items))
        out = fused_dpo_loss(hidden, head.weight, batch["targets"], batch["segments"], ref, beta=0.5)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss.detach(), logps, grads))
    (loss0, lp0, g0), (loss1, lp1, g1) = results
    # Llama's RMSNorm (and eager attention's softmax) compute in float32 even in a float64 model: the two
    # layouts' hidden states differ in the last float64 bits, which now and then round to another float32 there
    # (relative ~1e-9 in the log-probs, ~1e-8 in the gradients); a wrong mask or position is off by far more
    torch.testing.assert_close(lp1, lp0, rtol=1e-7, atol=0)
    torch.testing.assert_close(loss1, loss0, rtol=1e-7, atol=0)
    assert max(float(g.abs().max()) for g in g0.values()) > 0
    for n in g0:
        assert float((g1[n] - g0[n]).abs().max()) <= 1e-6 * float(g0[n].abs().max()), n


def test_share_prompt_trains_like_the_padded_layout(tiny_dir, tmp_path):
    """Two iterations with train.share_prompt: initial margins exactly 0, and the same metrics and adapter as the
    padded layout up to float32 rounding."""
    base = dict(learning_rate=5e-3, epochs=1, batch_size=2, grad_accum=2, max_length=64, beta=0.5)
    ends = {}
    for shared in (False, True):
        tcfg = TrainConfig(**base, share_prompt=shared)
        it1, it2 = tmp_path / f"{shared}" / "iter_01", tmp_path / f"{shared}" / "iter_02"
        m1 = train_iteration(model_cfg(tiny_dir), tcfg, synthetic_pairs(8, seed=1), it1, None, progress=False)
        m2 = train_iteration(model_cfg(tiny_dir), tcfg, synthetic_pairs(8, seed=2), it2, it1 / "adapter",
                             progress=False)
        assert m1["initial_margin"] == 0.0 and m2["initial_margin"] == 0.0
        assert (torch.load(it1 / "ref_logps.pt")["key"].get("share_prompt") is True) == shared
        ends[shared] = (m2, torch.load(it2 / "ref_logps.pt")["logps"])
    (m_pad, ref_pad), (m_shared, ref_shared) = ends[False], ends[True]
    for pid, (c, r) in ref_pad.items():
        assert ref_shared[pid] == pytest.approx([c, r], rel=1e-5, abs=1e-4)
    for k in ("loss", "margins", "final_loss"):
        assert m_shared[k] == pytest.approx(m_pad[k], rel=1e-3, abs=1e-4), k


def test_share_prompt_refuses_attention_without_block_masks(tiny_dir, tmp_path, monkeypatch):
    from tpo_lite import models

    monkeypatch.setattr(models, "CUSTOM_MASK_ATTENTION", ("eager",))  # as if the model ran flash attention
    with pytest.raises(TpoError, match="share_prompt.*needs 'sdpa' or 'eager' attention"):
        train_iteration(model_cfg(tiny_dir), TrainConfig(share_prompt=True, max_length=64),
                        synthetic_pairs(2), tmp_path / "iter_01", None, progress=False)
    assert not (tmp_path / "iter_01" / "adapter").exists()
