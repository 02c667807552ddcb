"""Judges: reward model, pairwise LLM (local and OpenAI-compatible server), cache, config."""
import math

import numpy as np
import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.judges import JudgeConfig, make_judge
from tpo_lite.judges.base import Capabilities, Judge, JudgeResult
from tpo_lite.judges.cache import CachedJudge, JudgementCache, cache_key
from tpo_lite.judges.pairwise import (
    DEFAULT_JUDGE_TEMPLATE,
    LocalPairBackend,
    PairBackend,
    PairwiseJudge,
    parse_choice,
    schedule_pairs,
)
from tpo_lite.judges.reward_model import RewardModelJudge
from tpo_lite.stats import bradley_terry

from fake_server import FakeServer, louder, shown_pair
from tiny_models import char_tokenizer


class Inst:
    """Stands in for tpo_lite.instructions.Instruction (fields id, instruction, category, checks)."""

    def __init__(self, instruction, checks=None):
        self.id = "t-0"
        self.instruction = instruction
        self.category = "test"
        self.checks = checks


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def rm(tok):
    from tiny_models import tiny_llama

    # pad_token_id None: the judge must not rely on HF's pad-token pooling
    return tiny_llama(len(tok), head="score", num_labels=1, pad_token_id=None, max_position_embeddings=2048).eval()


@pytest.fixture(scope="module")
def lm(tok):
    from tiny_models import tiny_llama

    return tiny_llama(len(tok), seed=1, max_position_embeddings=2048).eval()


# ------------------------------------------------------------------------------------------------ reward model
def test_tokenizer_is_char_level(tok):
    assert tok.encode("AB c", add_special_tokens=False) == [tok.convert_tokens_to_ids(c) for c in "AB c"]


def test_reward_model_batched_scores_equal_unbatched_reference(rm, tok):
    inst = Inst("Write one word.")
    responses = ["hello", None, "a much longer response than the others", "hi", "hello there"]
    judge = RewardModelJudge(rm, tok, batch_size=2)
    res = judge.score(inst, responses)
    assert res.scores[1] is None and res.details[1] == {"invalid": True}
    for r, s in zip(responses, res.scores):
        if r is None:
            continue
        text = tok.apply_chat_template([{"role": "user", "content": inst.instruction},
                                        {"role": "assistant", "content": r}], tokenize=False)
        assert text == f"<|im_start|>user\nWrite one word.<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>\n"
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            ref = rm(input_ids=ids).logits[0, 0].item()  # batch of one, no padding: the last token
        assert s == pytest.approx(ref, abs=1e-4)
    # Different responses really get different scores (the model is not constant).
    valid = [s for s in res.scores if s is not None]
    assert len(set(round(v, 6) for v in valid)) == len(valid)


def test_reward_model_compare_is_sigmoid_of_reward_difference(rm, tok):
    judge = RewardModelJudge(rm, tok)
    ra, rb = judge.score("Q", ["first", "second answer"]).scores
    assert judge.compare("Q", "first", "second answer") == pytest.approx(1 / (1 + math.exp(-(ra - rb))))


def test_reward_model_truncation_flagged(rm, tok):
    judge = RewardModelJudge(rm, tok, max_length=40)
    res = judge.score("Q", ["x" * 100, "y"])
    assert res.details[0].get("truncated") is True and "truncated" not in res.details[1]
    assert all(math.isfinite(s) for s in res.scores)


def test_reward_model_without_chat_template_refused(rm):
    t = char_tokenizer()
    t.chat_template = None
    with pytest.raises(TpoError, match="no chat template"):
        RewardModelJudge(rm, t)


# ---------------------------------------------------------------------------------------------- pair schedule
def test_schedule_pairs():
    assert schedule_pairs(4, "all") == [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]
    assert schedule_pairs(4, "round_robin") == [(0, 1), (0, 3), (1, 2), (2, 3)]
    assert schedule_pairs(2, "round_robin") == [(0, 1)]
    assert schedule_pairs(1, "all") == []
    r = schedule_pairs(8, "random:10", seed=3, salt="q")
    assert len(r) == 10 and len(set(r)) == 10 and all(i < j for i, j in r)
    assert r == schedule_pairs(8, "random:10", seed=3, salt="q")  # reproducible
    assert {i for p in r for i in p} == set(range(8))  # a cycle first: everyone compared
    assert schedule_pairs(4, "random:99") == schedule_pairs(4, "all")
    with pytest.raises(TpoError, match="pair schedule"):
        schedule_pairs(4, "every")


def test_parse_choice():
    assert parse_choice("A") == "A"
    assert parse_choice(" [[B]]") == "B"
    assert parse_choice("Response B is better.") == "B"
    assert parse_choice("Answer: A") == "A"
    assert parse_choice("Both are bad") is None


# ------------------------------------------------------------------------------------- pairwise aggregation
class ScriptedBackend(PairBackend):
    """P(A) = sigmoid(q[a] - q[b] + bias), where the quality q is read from the response text."""

    kind = "scripted"
    model_id = "scripted"

    def __init__(self, quality, bias=0.0):
        self.quality = quality
        self.bias = bias
        self.prompts = []

    def judge(self, prompts, on_result):
        for k, p in enumerate(prompts):
            self.prompts.append(p)
            a, b = shown_pair(p)
            on_result(k, 1 / (1 + math.exp(-(self.quality[a] - self.quality[b] + self.bias))), {})


def test_pairwise_scores_are_bradley_terry_of_both_orders():
    q = {"bad": -1.0, "ok": 0.0, "good": 1.0, "great": 2.0}
    backend = ScriptedBackend(q, bias=0.4)
    judge = PairwiseJudge(backend, bt_l2=1e-6)
    responses = ["ok", None, "great", "bad", "good"]
    res = judge.score(Inst("Rate these."), responses)
    # 4 valid -> 6 pairs, each in both orders.
    assert len(backend.prompts) == 12
    assert res.scores[1] is None
    valid = [0, 2, 3, 4]
    theta = np.array([res.scores[i] for i in valid])
    truth = np.array([q[responses[i]] for i in valid])
    # The scores are the BT fit of all ordered judgements (i shown as A beats j with P_A(i, j); j shown as A
    # loses with 1 - P_A(j, i) ...), which a position bias only shrinks but never reorders.
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    comps = [(x, y, sig(truth[x] - truth[y] + 0.4)) for x in range(4) for y in range(4) if x != y]
    np.testing.assert_allclose(theta, bradley_terry(4, comps, l2=1e-6), atol=1e-6)
    assert list(np.argsort(theta)) == list(np.argsort(truth))
    # Without a position bias BT recovers the true strengths exactly (centred).
    unbiased = PairwiseJudge(ScriptedBackend(q), bt_l2=1e-6).score(Inst("Rate these."), responses)
    np.testing.assert_allclose([unbiased.scores[i] for i in valid], truth - truth.mean(), atol=1e-4)
    # position bias: mean P(A) - 0.5 over ordered judgements, > 0 when the judge likes slot A.
    pa = [1 / (1 + math.exp(-(q[responses[a]] - q[responses[b]] + 0.4)))
          for a in valid for b in valid if a != b]
    assert res.details[0]["position_bias"] == pytest.approx(np.mean(pa) - 0.5)
    assert res.details[0]["position_bias"] > 0.05
    assert res.details[0]["comparisons"] == 6
    # The instruction is the original text and responses are the only other content.
    assert "Rate these." in backend.prompts[0]


def test_pairwise_never_sends_invalid_and_handles_all_invalid():
    backend = ScriptedBackend({"x": 0.0})
    judge = PairwiseJudge(backend)
    assert judge.score("Q", [None, None]).scores == [None, None]
    assert judge.score("Q", [None, "x"]).scores == [None, 0.0]
    assert backend.prompts == []


def test_pairwise_compare_is_one_order_and_compare_both_debiases():
    q = {"lo": 0.0, "hi": 1.0}
    judge = PairwiseJudge(ScriptedBackend(q, bias=0.5))
    p_ab = judge.compare("Q", "hi", "lo")
    p_ba = judge.compare("Q", "lo", "hi")
    assert p_ab == pytest.approx(1 / (1 + math.exp(-1.5)))
    assert p_ba == pytest.approx(1 / (1 + math.exp(-(-0.5))))
    both = judge.compare_both("Q", "hi", "lo")
    assert both["p"] == pytest.approx((p_ab + 1 - p_ba) / 2)
    assert both["position_bias"] == pytest.approx((p_ab + p_ba) / 2 - 0.5)


def test_pairwise_template_validation():
    with pytest.raises(TpoError, match=r"\{response_b\}"):
        PairwiseJudge(ScriptedBackend({}), template="{instruction} {response_a}")
    # Braces inside responses are left alone (no str.format).
    backend = ScriptedBackend({"{a}": 0.0, "{b}": 1.0})
    PairwiseJudge(backend).score("Q {x}", ["{a}", "{b}"])
    assert "Q {x}" in backend.prompts[0]


def test_local_pairwise_matches_unbatched_reference(lm, tok):
    backend = LocalPairBackend(lm, tok, batch_size=3)
    judge = PairwiseJudge(backend, bt_l2=0.1)
    inst = Inst("Pick the best.")
    responses = ["one", "two two", None, "three three three"]
    res = judge.score(inst, responses)
    a_id = tok.convert_tokens_to_ids("A")
    b_id = tok.convert_tokens_to_ids("B")
    assert backend.a_ids == [a_id] and backend.b_ids == [b_id]
    valid = [0, 1, 3]
    comps = []
    for x in range(3):
        for y in range(3):
            if x == y:
                continue
            prompt = DEFAULT_JUDGE_TEMPLATE.replace("{instruction}", inst.instruction) \
                .replace("{response_a}", responses[valid[x]]).replace("{response_b}", responses[valid[y]])
            text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True)
            ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                probs = torch.softmax(lm(input_ids=ids).logits[0, -1].double(), -1)
            p = (probs[a_id] / (probs[a_id] + probs[b_id])).item()
            assert judge.compare(inst, responses[valid[x]], responses[valid[y]]) == pytest.approx(p, abs=1e-4)
            comps.append((x, y, p))
    ref = bradley_terry(3, comps, l2=0.1)
    got = np.array([res.scores[i] for i in valid])
    np.testing.assert_allclose(got, ref, atol=1e-4)
    assert res.scores[2] is None


# ------------------------------------------------------------------------------------------- fake judge server
def _judge_reply(mode="ok"):
    """How the fake judge server answers: "ok" names the response with more '!' (fake_server.louder);
    "logprobs" adds the verdict token's log-probs when asked (P(A) 0.9 or 0.2); "fail" is an HTTP 503,
    "bad_request" an HTTP 400."""

    def reply(method, path, body):
        if mode == "fail":
            return 503, b"overloaded"
        if mode == "bad_request":
            return 400, b'{"error": "model not found"}'
        choice = louder(body["messages"][0]["content"])
        msg = {"message": {"role": "assistant", "content": f"[[{choice}]]"}}
        if mode == "logprobs" and body.get("logprobs"):
            pa = 0.9 if choice == "A" else 0.2
            msg["logprobs"] = {"content": [{"token": "[[", "logprob": 0.0, "top_logprobs": [
                {"token": "[[", "logprob": 0.0}]}, {"token": choice, "logprob": -0.1, "top_logprobs": [
                {"token": "A", "logprob": math.log(pa * 0.8)},
                {"token": " B", "logprob": math.log((1 - pa) * 0.8)},
                {"token": "C", "logprob": math.log(0.2)}]}]}
        return 200, {"choices": [msg]}

    return reply


def _server_cfg(url, **kw):
    base = dict(kind="pairwise", base_url=url, served_model="judge-1", retry_backoff_s=0.01, concurrency=3,
                cache=False)
    base.update(kw)
    return JudgeConfig(**base)


def test_server_judge_parses_answers_and_both_orders(monkeypatch):
    monkeypatch.setenv("TEST_JUDGE_KEY", "sekret")
    with FakeServer(_judge_reply("ok")) as srv:
        judge = make_judge(_server_cfg(srv.url, api_key_env="TEST_JUDGE_KEY", server_logprobs=False))
        res = judge.score(Inst("Be excited."), ["meh", "wow!!", "yes!", None])
    assert len(srv.requests) == 6  # 3 valid -> 3 pairs x 2 orders
    r0 = srv.requests[0]
    assert r0.path == "/v1/chat/completions" and r0.auth == "Bearer sekret"
    assert r0.body["model"] == "judge-1" and r0.body["temperature"] == 0.0
    assert "logprobs" not in r0.body
    s = res.scores
    assert s[1] > s[2] > s[0] and s[3] is None
    assert abs(sum(x for x in s if x is not None)) < 1e-9  # centred


def test_server_judge_reads_logprobs():
    with FakeServer(_judge_reply("logprobs")) as srv:
        judge = make_judge(_server_cfg(srv.url))
        p = judge.compare("Q", "hey!", "hey")
    assert srv.requests[0].body["logprobs"] is True
    assert p == pytest.approx(0.9)  # renormalised over the A/B mass, " B" counts as B


def test_server_down_bounded_retries_then_clear_error():
    with FakeServer(_judge_reply("fail")) as srv:
        judge = make_judge(_server_cfg(srv.url, max_retries=2))
        with pytest.raises(TpoError, match=r"failed after 3 attempts .*HTTP 503"):
            judge.score("Q", ["a", "b"])
    # 2 ordered comparisons, each tried 1 + 2 times.
    assert len(srv.requests) == 6


def test_server_client_error_not_retried():
    with FakeServer(_judge_reply("bad_request")) as srv:
        judge = make_judge(_server_cfg(srv.url, max_retries=5, concurrency=1))
        with pytest.raises(TpoError, match="refused the request: HTTP 400.*model not found"):
            judge.compare("Q", "a", "b")
    assert len(srv.requests) == 1


def test_server_unreachable_clear_error():
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    judge = make_judge(_server_cfg(f"http://127.0.0.1:{port}/v1", max_retries=1))
    with pytest.raises(TpoError, match=r"judge\.base_url|failed after 2 attempts"):
        judge.compare("Q", "a", "b")


def test_server_judge_cache_survives_restart(tmp_path):
    path = tmp_path / "cache.sqlite"
    with FakeServer(_judge_reply("ok")) as srv:
        judge = make_judge(_server_cfg(srv.url, cache=True), cache_path=path)
        first = judge.score("Q", ["a!", "b", "c!!"]).scores
        n = len(srv.requests)
        again = make_judge(_server_cfg(srv.url, cache=True), cache_path=path)  # a "restart"
        assert again.score("Q", ["a!", "b", "c!!"]).scores == pytest.approx(first)
        assert len(srv.requests) == n == 6
        # A changed instruction is judged afresh.
        again.score("Q2", ["a!", "b"])
        assert len(srv.requests) == 8


# ------------------------------------------------------------------------------------------------------ cache
class CountingJudge(Judge):
    name = "counting"
    capabilities = Capabilities(scores_absolute=True, compares_pairs=False, learned=True)

    def __init__(self):
        self.calls = []

    def score(self, instruction, responses):
        self.calls.append(list(responses))
        return JudgeResult([float(len(r)) for r in responses], [{"len": len(r)} for r in responses])


def test_cached_judge_judges_each_response_once_across_restarts(tmp_path):
    path = tmp_path / "c.sqlite"
    inner = CountingJudge()
    j = CachedJudge(inner, JudgementCache(path))
    res = j.score(Inst("Q"), ["aa", None, "bbb", "aa"])
    assert res.scores == [2.0, None, 3.0, 2.0]
    assert res.details[1] == {"invalid": True} and res.details[2] == {"len": 3}
    assert inner.calls == [["aa", "bbb"]]  # the duplicate was judged once, None never
    j2 = CachedJudge(inner, JudgementCache(path))  # reopened file
    assert j2.score(Inst("Q"), ["bbb", "cccc"]).scores == [3.0, 4.0]
    assert inner.calls[-1] == ["cccc"]
    # The checks are part of the key: same text, different checks -> judged again.
    j2.score(Inst("Q", checks=[{"type": "max_words", "value": 3}]), ["aa"])
    assert inner.calls[-1] == ["aa"]
    assert len(JudgementCache(path)) == 4


def test_cache_key_depends_on_every_part():
    k = cache_key("judge", Inst("Q"), "r")
    assert k != cache_key("judge2", Inst("Q"), "r")
    assert k != cache_key("judge", Inst("Q2"), "r")
    assert k != cache_key("judge", Inst("Q"), "r2")
    assert k != cache_key("judge", Inst("Q", checks=[1]), "r")
    assert k == cache_key("judge", "Q", "r")  # a plain string instruction has no checks
    assert cache_key("j", "Q", "a", "b") != cache_key("j", "Q", "b", "a")  # ordered pairs


def test_corrupt_cache_file_clear_error(tmp_path):
    p = tmp_path / "bad.sqlite"
    p.write_bytes(b"this is not a database" * 100)
    with pytest.raises(TpoError, match="bad.sqlite: judge.cache_path: cannot open the judgement cache .*delete it"):
        JudgementCache(p)


# ------------------------------------------------------------------------------------------------- config
def test_judge_config_validation(tmp_path):
    with pytest.raises(TpoError, match="reward_model judge needs a model"):
        JudgeConfig(kind="reward_model")
    with pytest.raises(TpoError, match="served_model"):
        JudgeConfig(kind="pairwise", base_url="http://x/v1")
    with pytest.raises(TpoError, match="pair schedule"):
        JudgeConfig(pair_schedule="random:0")
    with pytest.raises(TpoError, match="lacks"):
        JudgeConfig(kind="pairwise", model="m", prompt_template="Which? {response_a} {response_b}")
    f = tmp_path / "tpl.txt"
    f.write_text("I: {instruction}\nA: {response_a}\nB: {response_b}\nA or B?")
    cfg = JudgeConfig(kind="pairwise", model="m", prompt_template=str(f))
    assert cfg.resolved_template().startswith("I: {instruction}")
    f.write_text("no placeholders")
    with pytest.raises(TpoError, match="tpl.txt: prompt_template"):
        JudgeConfig(kind="pairwise", model="m", prompt_template=str(f))
    from dataclasses import fields

    for fl in fields(JudgeConfig):
        assert fl.metadata.get("help"), fl.name


def test_make_judge_reward_model_with_loaded_model_and_cache(rm, tok, tmp_path):
    cfg = JudgeConfig(kind="reward_model", model="tiny", batch_size=2)
    judge = make_judge(cfg, cache_path=tmp_path / "j.sqlite", model=rm, tokenizer=tok)
    assert isinstance(judge, CachedJudge)
    a = judge.score("Q", ["x", "yy"]).scores
    b = RewardModelJudge(rm, tok).score("Q", ["x", "yy"]).scores
    assert a == pytest.approx(b, abs=1e-5)


def test_reward_model_from_pretrained_roundtrip(rm, tok, tmp_path):
    d = tmp_path / "rm"
    rm.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = JudgeConfig(kind="reward_model", model=str(d), device="cpu", cache=False)
    judge = make_judge(cfg)
    assert judge.name == "reward_model:rm"
    assert judge.score("Q", ["x"]).scores == pytest.approx(RewardModelJudge(rm, tok).score("Q", ["x"]).scores,
                                                          abs=1e-5)
    with pytest.raises(TpoError, match="cannot load"):
        make_judge(JudgeConfig(kind="reward_model", model=str(tmp_path / "missing"), cache=False))


def test_make_judge_programmatic_cached(tmp_path):
    cfg = JudgeConfig(kind="programmatic", tie_weight=0.0)
    judge = make_judge(cfg, cache_path=tmp_path / "p.sqlite")
    inst = Inst("Answer in at most 3 words.", checks=[{"type": "max_words", "value": 3}])
    res = judge.score(inst, ["one two", None, "one two three four five"])
    assert res.scores == [1.0, None, 0.0]
    assert len(judge.cache) == 2
    uncached = make_judge(JudgeConfig(kind="programmatic", cache=False))
    assert uncached.score(inst, ["a b c d"]).scores[0] == pytest.approx(0.25 * 3 / 4)  # near-miss credit
    with pytest.raises(TpoError, match="tie_weight"):
        JudgeConfig(tie_weight=1.0)


def test_cached_judge_exposes_compare_only_when_inner_can(rm, tok, tmp_path):
    cache = JudgementCache(tmp_path / "x.sqlite")
    counting = CachedJudge(CountingJudge(), cache)
    assert counting.capabilities == CountingJudge.capabilities and not counting.capabilities.compares_pairs
    with pytest.raises(TpoError, match="judge counting cannot compare two responses"):
        counting.compare("Q", "a", "bb")
    assert len(cache) == 0  # a refused comparison caches nothing
    cj = CachedJudge(RewardModelJudge(rm, tok), cache)
    assert cj.capabilities == RewardModelJudge.capabilities
    p = cj.compare("Q", "a", "bb")
    assert p == pytest.approx(RewardModelJudge(rm, tok).compare("Q", "a", "bb"), abs=1e-6)
    assert cj.compare("Q", "a", "bb") == p  # from the cache now


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_judges_on_cuda_match_cpu(rm, lm, tok):
    import copy

    inst = Inst("Pick one.")
    responses = ["short", "a longer answer", None]
    cpu_rm = RewardModelJudge(rm, tok, batch_size=2).score(inst, responses).scores
    gpu_rm = RewardModelJudge(copy.deepcopy(rm).cuda(), tok, batch_size=2).score(inst, responses).scores
    assert gpu_rm[2] is None
    np.testing.assert_allclose(gpu_rm[:2], cpu_rm[:2], atol=1e-3)
    cpu_pw = PairwiseJudge(LocalPairBackend(lm, tok)).score(inst, responses).scores
    gpu_pw = PairwiseJudge(LocalPairBackend(copy.deepcopy(lm).cuda(), tok)).score(inst, responses).scores
    np.testing.assert_allclose(gpu_pw[:2], cpu_pw[:2], atol=1e-3)


class _CustomRM(torch.nn.Module):
    """A reward model with its own pooling (no ``score`` head attribute): the judge must call it whole."""

    def __init__(self, backbone, head, out_dim=1):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.out_dim = out_dim
        self.config = backbone.config

    def forward(self, input_ids, attention_mask, position_ids):
        from types import SimpleNamespace

        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                          position_ids=position_ids).last_hidden_state[:, -1]
        return SimpleNamespace(logits=self.head(h).repeat(1, self.out_dim))


def test_reward_model_custom_pooling_path_and_shape_check(rm, tok):
    custom = _CustomRM(rm.model, rm.score)
    responses = ["x", "a longer one", None]
    got = RewardModelJudge(custom, tok, batch_size=3).score("Q", responses).scores
    ref = RewardModelJudge(rm, tok, batch_size=1).score("Q", responses).scores
    assert got[2] is None
    np.testing.assert_allclose(got[:2], ref[:2], atol=1e-5)
    with pytest.raises(TpoError, match=r"logits of shape \(2, 2\)"):
        RewardModelJudge(_CustomRM(rm.model, rm.score, out_dim=2), tok).score("Q", ["a", "b"])


def test_cached_judge_refuses_a_judge_whose_scores_are_relative(tmp_path):
    """A pairwise judge's score of a response depends on the other responses of the call (Bradley-Terry): a
    per-response cache would hand a score from one group to another. Its capabilities say so, and
    CachedJudge refuses it."""
    judge = PairwiseJudge(ScriptedBackend({"a": 0.0, "b": 1.0}))
    assert not judge.capabilities.scores_absolute and judge.capabilities.compares_pairs
    with pytest.raises(TpoError, match="cannot be cached per response"):
        CachedJudge(judge, JudgementCache(tmp_path / "c.sqlite"))
