"""Judges as plugins: a reward function (`judge.function`, TRL's reward_funcs signature), reward models with their
own code (`judge.trust_remote_code`, an ArmoRM-like multi-objective model built here) and a reasoning model as
the server pairwise judge (`judge.max_tokens`, `judge.chat_template_kwargs`, verdict from the final answer)."""
import json
import math
import sys

import numpy as np
import pytest
import torch

from tpo_lite.errors import TpoError
from tpo_lite.judges import JudgeConfig, judge_class, make_judge
from tpo_lite.judges.base import fingerprint
from tpo_lite.judges.cache import CachedJudge
from tpo_lite.judges.pairwise import DEFAULT_JUDGE_TEMPLATE, LocalPairBackend, PairwiseJudge, ServerPairBackend

from fake_server import FakeServer, louder
from test_judges import Inst
from tiny_models import CHATML, char_tokenizer


# ------------------------------------------------------------------------------------------- function judge

REWARDS_PY = '''
CALLS = []

def exclaim(prompts, completions, **kwargs):
    """TRL's signature: one float per completion; None = not scored."""
    CALLS.append({"prompts": list(prompts), "completions": list(completions), **kwargs})
    return [None if c == "skip" else float(c.count("!")) for c in completions]

def only_completions(completions):
    import numpy as np
    return np.array([len(c) for c in completions], dtype=np.float32)

def too_few(prompts, completions, **kwargs):
    return [1.0]

def not_finite(prompts, completions, **kwargs):
    return [float("nan")] * len(completions)

def words(prompts, completions, **kwargs):
    return ["good"] * len(completions)

def no_completions(prompts):
    return []

def needs_more(prompts, completions, reference):
    return []

NOT_CALLABLE = 3
'''


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    """A module `tpo_rewards_<n>` in a fresh directory that is the current directory (as next to a config)."""
    name = f"tpo_rewards_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(REWARDS_PY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_function appends the cwd: undone after the test
    yield name
    sys.modules.pop(name, None)


def test_function_judge_called_like_trl_reward_funcs_and_cached(rewards_module, tmp_path):
    cfg = JudgeConfig(kind="function", function=f"{rewards_module}:exclaim")
    judge = make_judge(cfg, cache_path=tmp_path / "c.sqlite")
    assert isinstance(judge, CachedJudge) and judge.name == f"function:{rewards_module}:exclaim"
    checks = [{"type": "max_words", "value": 5}]
    res = judge.score(Inst("Be excited.", checks), ["wow!!", None, "meh", "skip"])
    assert res.scores == [2.0, None, 0.0, None]
    assert res.details[0] == {"reward": 2.0} and res.details[1] == {"invalid": True}
    assert res.details[3] == {"unscored": True}
    calls = sys.modules[rewards_module].CALLS
    # One call per instruction, by keyword: the original instruction, the valid responses only, the checks.
    assert calls == [{"prompts": ["Be excited."] * 3, "completions": ["wow!!", "meh", "skip"],
                      "checks": [checks] * 3}]
    # Cached per response: a known response is not sent again.
    again = judge.score(Inst("Be excited.", checks), ["meh", "new!"])
    assert again.scores == [0.0, 1.0]
    assert calls[1]["completions"] == ["new!"]
    assert judge.compare("Q", "a!", "b") == 1.0 and judge.compare("Q", "a", "b") == 0.5
    assert judge.compare("Q", "skip", "b") == 0.0  # a scored response beats an unscored one


def test_function_judge_from_a_file_gets_only_the_arguments_it_names(tmp_path):
    from tpo_lite.judges.function import FunctionJudge

    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    judge = make_judge(JudgeConfig(kind="function", function=f"{path}:only_completions", cache=False))
    assert isinstance(judge, FunctionJudge)
    assert judge.score("Q", ["ab", None, "abcd"]).scores == [2.0, None, 4.0]  # a NumPy array is fine


def test_function_judge_errors_name_the_option(rewards_module, tmp_path):
    def build(spec):
        return make_judge(JudgeConfig(kind="function", function=spec, cache=False))

    for spec, message in [("no_such_module_xyz:f", r"cannot import module 'no_such_module_xyz'"),
                          (f"{rewards_module}:missing", r"has no 'missing'"),
                          (f"{rewards_module}:NOT_CALLABLE", r"is a int, not a function"),
                          (f"{rewards_module}:no_completions", r"takes no 'completions' argument"),
                          (f"{rewards_module}:needs_more", r"requires reference")]:
        with pytest.raises(TpoError, match=message) as e:
            build(spec)
        assert e.value.field == "judge.function", spec
    for spec, message in [(f"{rewards_module}:too_few", r"returned 1 scores for 2 completions"),
                          (f"{rewards_module}:not_finite", r"non-finite score \(nan\) for completion 0"),
                          (f"{rewards_module}:words", r"returned 'good' for completion 0")]:
        with pytest.raises(TpoError, match=message) as e:
            build(spec).score("Q", ["a", "b"])
        assert e.value.field == "judge.function", spec
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_dependency_xyz\ndef f(completions): return []\n")
    with pytest.raises(TpoError, match=r"ModuleNotFoundError.*no_such_dependency_xyz"):
        build(f"{bad}:f")


def test_function_judge_config_checks_the_form_not_the_import(tmp_path):
    with pytest.raises(TpoError, match="needs function") as e:
        JudgeConfig(kind="function")
    assert e.value.field == "function"
    with pytest.raises(TpoError, match="expected 'module:function'"):
        JudgeConfig(kind="function", function="just_a_module")
    with pytest.raises(TpoError, match="file not found"):
        JudgeConfig(kind="function", function=str(tmp_path / "nope.py") + ":f")
    JudgeConfig(kind="function", function="not_imported_at_config_time:f")  # imported only when the judge is built


def test_function_judge_config_from_toml(tmp_path):
    from tpo_lite.config import load_config

    path = tmp_path / "rewards.py"
    path.write_text(REWARDS_PY)
    toml = tmp_path / "run.toml"
    toml.write_text(f'[judge]\nkind = "function"\nfunction = "{path}:exclaim"\nfunction_learned = true\n')
    cfg = load_config(toml).judge
    assert (cfg.kind, cfg.function, cfg.function_learned) == ("function", f"{path}:exclaim", True)
    toml.write_text('[judge]\nkind = "function"\nfunction = "oops"\n')
    with pytest.raises(TpoError, match=r"run\.toml:3: judge\.function: expected 'module:function'"):
        load_config(toml)


def test_function_judge_capabilities_follow_function_learned(tmp_path):
    path = tmp_path / "rewards.py"
    path.write_text(REWARDS_PY)
    rule = JudgeConfig(kind="function", function=f"{path}:exclaim")
    model = JudgeConfig(kind="function", function=f"{path}:exclaim", function_learned=True)
    assert judge_class("function").capabilities.learned is False
    assert judge_class(rule).capabilities.learned is False
    assert judge_class(model).capabilities.learned is True
    caps = make_judge(model, cache_path=tmp_path / "c.sqlite").capabilities
    assert caps.learned and caps.scores_absolute and caps.compares_pairs


# ------------------------------------------------------------------------ reward model with its own code

CONFIGURATION_PY = '''
from transformers import LlamaConfig

class TinyArmoConfig(LlamaConfig):
    model_type = "tiny_armo"
'''

# Like ArmoRM's modeling_custom.py: a Llama backbone, a per-objective regression layer and a gating network over
# the objectives; forward returns a ModelOutput with the per-objective `rewards` and the gated `score`. Its
# `logits` here hold the first objective alone, so reading logits instead of score would be seen.
MODELING_PY = '''
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from transformers import LlamaModel, LlamaPreTrainedModel
from transformers.utils import ModelOutput
{config_import}

@dataclass
class TinyArmoOutput(ModelOutput):
    rewards: Optional[torch.FloatTensor] = None
    gating_output: Optional[torch.FloatTensor] = None
    score: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None


class TinyArmoRM(LlamaPreTrainedModel):
    {config_class}
    def __init__(self, config):
        super().__init__(config)
        self.model = LlamaModel(config)
        self.regression_layer = nn.Linear(config.hidden_size, config.num_objectives, bias=False)
        self.gating = nn.Linear(config.hidden_size, config.num_objectives)
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids).last_hidden_state[:, -1]
        rewards = self.regression_layer(hidden).float()
        gating_output = torch.softmax(self.gating(hidden).float(), dim=-1)
        score = (gating_output * rewards).sum(dim=1)  # [B], as ArmoRM
        return TinyArmoOutput(rewards=rewards, gating_output=gating_output, score=score, logits=rewards[:, :1])
'''


def write_armo_like(root, layout: str):
    """Save a tiny ArmoRM-like reward model with its own code. ``layout``: "custom_config" (its own config class
    and model type, both in auto_map) or "llama" (model_type llama and auto_map for the model class only,
    exactly as ArmoRM-Llama3-8B's config.json)."""
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, LlamaConfig

    # A directory name of its own: transformers imports the code as transformers_modules.<name>.
    d = root / f"armo_{layout}_{root.name.replace('-', '_')}"
    d.mkdir()
    custom = layout == "custom_config"
    (d / "modeling_tiny_armo.py").write_text(MODELING_PY.format(
        config_import="from .configuration_tiny_armo import TinyArmoConfig" if custom else "",
        config_class="config_class = TinyArmoConfig" if custom else ""))
    tok = char_tokenizer()
    tok.save_pretrained(d)
    conf = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                       num_labels=1).to_dict()  # one label, as ArmoRM's config
    conf.update(num_objectives=4, architectures=["TinyArmoRM"],
                auto_map={"AutoModelForSequenceClassification": "modeling_tiny_armo.TinyArmoRM"})
    if custom:
        (d / "configuration_tiny_armo.py").write_text(CONFIGURATION_PY)
        conf["model_type"] = "tiny_armo"
        conf["auto_map"]["AutoConfig"] = "configuration_tiny_armo.TinyArmoConfig"
    (d / "config.json").write_text(json.dumps(conf))
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(AutoConfig.from_pretrained(d, trust_remote_code=True),
                                                           trust_remote_code=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))
    return d


def _rm_cfg(path, **kw):
    return JudgeConfig(kind="reward_model", model=str(path), device="cpu", dtype="float32", cache=False, **kw)


@pytest.mark.parametrize("layout", ["custom_config", "llama"])
def test_multi_objective_custom_code_rm_scores_its_score_field(tmp_path, layout):
    from transformers import AutoModelForSequenceClassification

    d = write_armo_like(tmp_path, layout)
    judge = make_judge(_rm_cfg(d, trust_remote_code=True, batch_size=3))
    responses = ["Sure.", None, "A much longer answer here.", "ok"]
    res = judge.score(Inst("Help me."), responses)
    # Reference: the model's own forward on each conversation alone, as ArmoRM's model card reads it
    # (output.score); the custom code really ran (a stock class has no `score` output).
    model = AutoModelForSequenceClassification.from_pretrained(d, trust_remote_code=True).eval()
    assert type(model).__name__ == "TinyArmoRM"
    tok = judge.tokenizer
    want, objectives = [], []
    for r in responses:
        if r is None:
            want.append(None)
            objectives.append(None)
            continue
        text = tok.apply_chat_template([{"role": "user", "content": "Help me."}, {"role": "assistant", "content": r}],
                                       tokenize=False)
        with torch.no_grad():
            out = model(input_ids=torch.tensor([tok(text, add_special_tokens=False)["input_ids"]]))
        want.append(float(out.score[0]))
        objectives.append(out.rewards[0].tolist())
    assert res.scores[1] is None
    np.testing.assert_allclose([s for s in res.scores if s is not None], [w for w in want if w is not None],
                               atol=1e-5)
    for k in (0, 2, 3):
        np.testing.assert_allclose(res.details[k]["rewards"], objectives[k], atol=1e-5)
        assert len(res.details[k]["rewards"]) == 4
    # score_field names another output field: the first objective alone (this model's logits), not the score.
    logits = make_judge(_rm_cfg(d, trust_remote_code=True, score_field="logits")).score("Help me.", ["ok"]).scores
    assert logits[0] == pytest.approx(objectives[3][0], abs=1e-5) and logits[0] != pytest.approx(want[3], abs=1e-4)
    with pytest.raises(TpoError, match=r"no field 'reward' \(it has: rewards, gating_output, score, logits\)"):
        make_judge(_rm_cfg(d, trust_remote_code=True, score_field="reward")).score("Q", ["a"])


@pytest.mark.parametrize("layout", ["custom_config", "llama"])
def test_custom_code_rm_refused_without_trust_remote_code(tmp_path, layout):
    """Off by default: a model that ships code is refused naming the option -- also when its config names a stock
    model type (ArmoRM: llama), where transformers would quietly load LlamaForSequenceClassification with a random
    head instead."""
    d = write_armo_like(tmp_path, layout)
    with pytest.raises(TpoError, match=r"ships its own code .*set judge\.trust_remote_code = true") as e:
        make_judge(_rm_cfg(d))
    assert e.value.field == "judge.trust_remote_code"


def test_stock_rm_score_field_must_exist(tmp_path):
    from tiny_models import tiny_llama

    tok = char_tokenizer()
    rm = tiny_llama(len(tok), size="micro", head="score", num_labels=1, max_position_embeddings=512)
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    auto = make_judge(_rm_cfg(tmp_path / "rm"))
    assert auto.score("Q", ["a"]).scores[0] == pytest.approx(
        make_judge(_rm_cfg(tmp_path / "rm", score_field="logits")).score("Q", ["a"]).scores[0], abs=1e-6)
    with pytest.raises(TpoError, match=r"no field 'score' \(it has: logits"):
        make_judge(_rm_cfg(tmp_path / "rm", score_field="score")).score("Q", ["a"])
    with pytest.raises(TpoError, match="expected 'auto' or an output field name"):
        JudgeConfig(kind="reward_model", model="x", score_field="not a name")


# ------------------------------------------------------------------------ reasoning model as the server judge

def _other(letter):
    return "B" if letter == "A" else "A"


def _reasoning_reply(mode: str):
    """A /chat/completions endpoint whose model thinks before its verdict (fake_server.louder); the thinking
    always names the *wrong* letter first, so reading it would flip the verdict. Modes: "parser" (vLLM with a
    reasoning parser: reasoning_content + content), "inline" (no parser: <think>...</think> in the content),
    "prefilled" (the template opened <think>: only its end is in the content), "cut_off" (max_tokens hit while
    thinking)."""

    def reply(method, path, body):
        verdict = louder(body["messages"][0]["content"])
        thought = f"Response {_other(verdict)} looks better at first. On reflection, no."
        finish, logprobs = "stop", None
        if mode == "parser":
            message = {"role": "assistant", "reasoning_content": thought, "content": f"[[{verdict}]]"}
            if body.get("logprobs"):
                # Every generated token has log-probs, the reasoning's too: its letter is the wrong one.
                p = 0.9 if verdict == "A" else 0.1
                logprobs = {"content": [
                    {"token": "Response", "logprob": -0.1, "top_logprobs": [{"token": "Response", "logprob": -0.1}]},
                    {"token": " " + _other(verdict), "logprob": -0.1, "top_logprobs": [
                        {"token": " A", "logprob": math.log(1 - p)}, {"token": " B", "logprob": math.log(p)}]},
                    {"token": "</think>", "logprob": 0.0, "top_logprobs": [{"token": "</think>", "logprob": 0.0}]},
                    {"token": "[[", "logprob": 0.0, "top_logprobs": [{"token": "[[", "logprob": 0.0}]},
                    {"token": verdict, "logprob": -0.1, "top_logprobs": [
                        {"token": "A", "logprob": math.log(p)}, {"token": "B", "logprob": math.log(1 - p)}]}]}
        elif mode == "inline":
            message = {"role": "assistant", "content": f"<think>\n{thought}\n</think>\n\nThe answer is [[{verdict}]]"}
        elif mode == "prefilled":
            message = {"role": "assistant", "content": f"{thought}\n</think>\n\n{verdict}"}
        else:  # cut_off
            message = {"role": "assistant", "content": f"<think>\n{thought} Let me compare A and B again"}
            finish = "length"
        choice = {"index": 0, "message": message, "finish_reason": finish}
        if logprobs is not None:
            choice["logprobs"] = logprobs
        return 200, {"choices": [choice]}

    return reply


def _server_cfg(url, **kw):
    base = dict(kind="pairwise", base_url=url, served_model="judge-r1", retry_backoff_s=0.01, concurrency=2,
                cache=False, max_tokens=4096, chat_template_kwargs={"enable_thinking": True})
    base.update(kw)
    return JudgeConfig(**base)


@pytest.mark.parametrize("mode", ["parser", "inline", "prefilled"])
def test_reasoning_judge_verdict_is_read_from_the_final_answer(mode):
    with FakeServer(_reasoning_reply(mode)) as srv:
        judge = make_judge(_server_cfg(srv.url, server_logprobs=False))
        res = judge.score(Inst("Be excited."), ["meh", "wow!!", "yes!", None])
        p = judge.compare("Q", "plain", "loud!")
    body = srv.requests[0].body
    assert body["max_tokens"] == 4096 and body["chat_template_kwargs"] == {"enable_thinking": True}
    assert body["model"] == "judge-r1" and "logprobs" not in body
    s = res.scores
    assert s[1] > s[2] > s[0] and s[3] is None
    assert p == 0.0  # B ("loud!") wins, although the thinking named the other letter first
    assert "unparsed" not in res.details[0]


def test_reasoning_judge_logprobs_are_read_after_the_reasoning():
    with FakeServer(_reasoning_reply("parser")) as srv:
        judge = make_judge(_server_cfg(srv.url))
        assert judge.compare("Q", "loud!", "plain") == pytest.approx(0.9)
        assert judge.compare("Q", "plain", "loud!") == pytest.approx(0.1)
    assert srv.requests[0].body["logprobs"] is True


def test_reasoning_judge_cut_off_before_a_verdict_is_a_flagged_tie():
    with FakeServer(_reasoning_reply("cut_off")) as srv:
        judge = make_judge(_server_cfg(srv.url, max_tokens=16, server_logprobs=False))
        assert judge.compare("Q", "a!", "b") == 0.5
        res = judge.score("Q", ["a!", "b", "c"])
    # every ordered judgement of the group (3 pairs x 2 orders) ran out of tokens: shown in each sample's details
    assert res.details[0]["unparsed"] == 6 and res.details[0]["cut_off"] == 6
    assert res.scores == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)


def test_final_answer():
    from tpo_lite.judges.pairwise import final_answer

    assert final_answer({"content": "B"}) == ("B", False)
    assert final_answer({"content": "B", "reasoning_content": "A?"}) == ("B", True)
    assert final_answer({"content": None, "reasoning": "A?"}) == ("", True)
    assert final_answer({"content": "<think>A?</think>\n B "}) == ("B", True)
    assert final_answer({"content": "A? </think>B"}) == ("B", True)
    assert final_answer({"content": "  <think>A? still thinking"}) == ("", True)


def test_server_options_change_the_judge_identity_and_defaults_keep_old_caches():
    def identity(**kw):
        return PairwiseJudge(ServerPairBackend("http://x/v1", "m", **kw)).identity

    # A judge with the defaults keeps the identity it had before these options existed.
    assert identity() == fingerprint("pairwise", "server", "m", DEFAULT_JUDGE_TEMPLATE, True)
    ids = {identity(), identity(max_tokens=4096), identity(chat_template_kwargs={"enable_thinking": False})}
    assert len(ids) == 3
    with pytest.raises(TpoError, match="not a JSON value"):
        JudgeConfig(kind="pairwise", model="m", chat_template_kwargs={"x": float("nan")})
    with pytest.raises(TpoError, match="must be >= 1"):
        JudgeConfig(kind="pairwise", model="m", max_tokens=0)


def test_local_pairwise_judge_passes_chat_template_kwargs():
    from tiny_models import tiny_llama

    tok = char_tokenizer()
    # Qwen3's switch: thinking off = an empty think block before the answer
    tok.chat_template = CHATML + ("{% if enable_thinking is defined and not enable_thinking %}"
                                  "<think>\n\n</think>\n\n{% endif %}")
    lm = tiny_llama(len(tok), size="micro", max_position_embeddings=2048).eval()
    plain = LocalPairBackend(lm, tok)
    off = make_judge(JudgeConfig(kind="pairwise", model="tiny", cache=False,
                                 chat_template_kwargs={"enable_thinking": False}), model=lm, tokenizer=tok)
    assert "</think>" in tok.decode(off.backend.render("Q")).replace(" ", "")  # the char tokenizer spaces its chars
    assert "</think>" not in tok.decode(plain.render("Q")).replace(" ", "")
    assert off.identity != PairwiseJudge(plain).identity
