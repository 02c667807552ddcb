"""Export the trained model: LoRA merged into the base weights, plus a chat template that applies the thought
prompt by itself and a model card that says how to split the output.

A TPO model only thinks when its prompt is wrapped in the thought template it was trained with. The exported
tokenizer's chat template therefore wraps the **last user message** in that template (and, if the run pre-filled
the assistant turn with the thought header, appends the header after the generation prompt), so any
``apply_chat_template`` user -- transformers pipelines, vLLM, TGI -- gets thoughts without knowing about TPO.
Pass ``tpo_thought_prompt=False`` to ``apply_chat_template`` to get the seed's own, unwrapped prompt (a variable
of our own, so a seed template's ``enable_thinking`` keeps its meaning). While the thought prompt is on, the
run's ``prompts.chat_template_kwargs`` are the defaults of the seed template's variables, so the exported
template renders exactly the training prompt. Earlier user turns are left as they are (the model was trained
on single turns and earlier assistant turns hold responses only).

The model card says per output format what splits the output, and only what is true: for ``think``, vLLM's
``deepseek_r1`` / ``qwen3`` reasoning parsers -- when the tokenizer has ``<think>`` and ``</think>`` as single
tokens, which those parsers need; for the generic markers, vLLM's ``granite`` parser only when the model writes
the thought header itself (a pre-filled header is in the prompt, and that parser then returns the whole output,
thought included, as the content).

OUT_DIR is guarded: it may not be, contain or lie inside the adapter, the run directory around it, the base
model or the current directory, and ``overwrite`` replaces only a previous export (a folder holding
``tpo_lite_export.json``), never another folder.

4-bit bases: when the model config loads the base in NF4, the adapter was trained against the *quantised*
weights, so the export loads the base in NF4, dequantises it (``W' = dequant(nf4(W))``) and merges the LoRA
into ``W'``: the exported float model computes the same function as the trained QLoRA model (up to the matmul
precision), rather than the LoRA update on weights it never saw.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tpo_lite.errors import TpoError
from tpo_lite.prompts import GENERIC_RESPONSE_MARKER, GENERIC_THOUGHT_HEADER, THINK_CLOSE, THINK_OPEN
from tpo_lite.rundir import RunDir

EXPORT_INFO = "tpo_lite_export.json"
_IN_PROGRESS = ".tpo_lite_export_in_progress"  # marks the temporary sibling as ours, so a rerun may remove it
_FIELD = "OUT_DIR"
# The exported template's switch for the thought prompt: not a seed template's own variable (Qwen3's
# enable_thinking), which the seed template must keep reading with its own meaning.
THOUGHT_PROMPT_VAR = "tpo_thought_prompt"


def _jinja_str(text: str) -> str:
    # A Jinja string literal: Jinja decodes backslash escapes like Python, and json.dumps (ASCII only)
    # produces exactly such escapes.
    return json.dumps(text, ensure_ascii=True)


def _jinja_literal(value) -> str:
    # chat_template_kwargs values (checked by prompts.check_chat_template_kwargs): JSON literals are Jinja
    # literals too (true/false, numbers, strings, lists, dicts with string keys).
    return json.dumps(value, ensure_ascii=True)


def thought_chat_template(base_template: str, template, prefill_thought_header: bool = False,
                          system_prompt: str | None = None, chat_template_kwargs: dict | None = None) -> str:
    """A chat template that renders exactly what :func:`tpo_lite.prompts.build_prompt` builds.

    ``base_template`` is the model's own chat template; ``template`` the thought :class:`~tpo_lite.prompts
    .Template`. The result wraps the last user message with ``template.wrap``; inserts ``system_prompt`` as a
    system message when the conversation has none; appends the thought header after the generation prompt
    when ``prefill_thought_header``; gives each ``chat_template_kwargs`` variable its value unless the caller
    passes it. All of it only while ``tpo_thought_prompt`` (:data:`THOUGHT_PROMPT_VAR`) is undefined or true.
    """
    from tpo_lite.prompts import check_chat_template_kwargs

    if not base_template:
        raise TpoError("the tokenizer has no chat template to extend", field="model.path")
    kwargs = check_chat_template_kwargs(dict(chat_template_kwargs or {}))
    prefix, suffix = template.wrapper.split("{instruction}")
    on = f"({THOUGHT_PROMPT_VAR} is not defined or {THOUGHT_PROMPT_VAR})"
    # No whitespace between tags and no whitespace-control dashes: nothing of the base template's own
    # leading/trailing text may be stripped.
    pre = (
        f"{{# tpo-lite: wrap the last user message in the thought prompt ({THOUGHT_PROMPT_VAR}=false turns it "
        "off) #}"
        f"{{% if {on} %}}"
    )
    for key, value in kwargs.items():  # the run's values, unless the caller gives its own
        pre += f"{{% if {key} is not defined %}}{{% set {key} = {_jinja_literal(value)} %}}{{% endif %}}"
    pre += (
        "{% set _tpo = namespace(msgs=[], last=-1) %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}{% set _tpo.last = loop.index0 %}{% endif %}{% endfor %}"
    )
    if system_prompt:
        pre += ("{% if messages|length == 0 or messages[0]['role'] != 'system' %}"
                f"{{% set _tpo.msgs = [{{'role': 'system', 'content': {_jinja_str(system_prompt)}}}] %}}"
                "{% endif %}")
    pre += (
        "{% for m in messages %}{% if loop.index0 == _tpo.last %}"
        f"{{% set _tpo.msgs = _tpo.msgs + [{{'role': 'user', 'content': {_jinja_str(prefix)} ~ m['content'] ~ "
        f"{_jinja_str(suffix)}}}] %}}"
        "{% else %}{% set _tpo.msgs = _tpo.msgs + [m] %}{% endif %}{% endfor %}"
        "{% set messages = _tpo.msgs %}"
        "{% endif %}"
    )
    post = ""
    if prefill_thought_header and template.thought_header:
        post = f"{{% if add_generation_prompt and {on} %}}{{{{ {_jinja_str(template.thought_header)} }}}}{{% endif %}}"
    return pre + base_template + post


def think_tags_are_tokens(tokenizer) -> bool:
    """True if ``<think>`` and ``</think>`` are single, non-special tokens of ``tokenizer``: what vLLM's
    deepseek_r1 / qwen3 reasoning parsers need (they look both up in ``get_vocab()`` and raise without them,
    vllm/reasoning/basic_parsers.py ``BaseThinkingReasoningParser.__init__``; streaming finds them by token id),
    and a special token would be dropped from the decoded output text."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ())
    return all(t in vocab and t not in special for t in (THINK_OPEN, THINK_CLOSE))


def _serving_note(template, prefill_thought_header: bool, think_tokens: bool) -> str:
    """What splits the output when served -- only what is true for this format (see the module docstring)."""
    if template.response_marker == THINK_CLOSE:
        rule = ("Their rule (`BaseThinkingReasoningParser.extract_reasoning` in vllm/reasoning/basic_parsers.py): "
                "drop the output up to its first `<think>`, if it has one (a `<think>` pre-filled by the chat "
                "template is in the prompt, not the output, and needs none), then split at the first "
                "`</think>`; without `</think>` the whole output is reasoning. They also split where a thought "
                "*quotes* the tag (`\"</think>\"`), which tpo-lite does not count as the end of the thought.")
        if think_tokens:
            return ("\n## Serving\n\nvLLM's `deepseek_r1` and `qwen3` reasoning parsers read this format: "
                    "`vllm serve THIS_DIR --reasoning-parser deepseek_r1` (or `qwen3`) returns the thought as "
                    "the message's reasoning and the response as its content. " + rule + "\n")
        return ("\n## Serving\n\nvLLM's `deepseek_r1` / `qwen3` reasoning parsers read this format only with a "
                "tokenizer that has `<think>` and `</think>` as single, non-special tokens: they look both up in "
                "the vocabulary and raise an error without them (`BaseThinkingReasoningParser.__init__` in "
                "vllm/reasoning/basic_parsers.py). This model's tokenizer does not have them, so split the text "
                "yourself (below). " + rule + "\n")
    if template.response_marker == GENERIC_RESPONSE_MARKER and template.thought_header == GENERIC_THOUGHT_HEADER:
        if prefill_thought_header:
            return ("\n## Serving\n\nDo not use vLLM's `granite` reasoning parser with this model: it splits only "
                    f"outputs that contain `{GENERIC_THOUGHT_HEADER}`, and this model's chat template writes that "
                    "header into the prompt, so the parser would return the whole output, thought included, as "
                    "the content. Split the text yourself (below).\n")
        return ("\n## Serving\n\nvLLM's `granite` reasoning parser (`--reasoning-parser granite`) splits an output "
                f"only when the model itself wrote `{GENERIC_THOUGHT_HEADER}` (or `Here's my thought process:`, "
                f"exactly so, without markdown) before `{GENERIC_RESPONSE_MARKER}` (or `Here's my response:`); "
                "any other output comes back whole, thought included, as the content. tpo-lite also accepts an "
                "output without the thought header, other letter case and markdown around the markers, so "
                "split the text yourself (below) to get every response.\n")
    return ""


def model_card(template, base_model: str, adapter: str, prefill_thought_header: bool,
               system_prompt: str | None, think_tokens: bool = False,
               chat_template_kwargs: dict | None = None) -> str:
    """The README.md of an exported model: output format, what splits it when served, how to strip the thought,
    provenance. ``think_tokens``: :func:`think_tags_are_tokens` of the exported tokenizer."""
    marker = template.response_marker
    header = template.thought_header.strip() if template.thought_header else None
    if marker is None:
        fmt = ("This model was exported with the `direct` template: there is no thought section, the whole "
               "output is the response.")
        strip = ""
    else:
        if marker == THINK_CLOSE:
            fmt = ("The output is `<think>` + line end + `thought` + line end + `</think>` + blank line + "
                   "`response` (the format of DeepSeek-R1 and Qwen3)"
                   + ("; the chat template already writes the `<think>` and its line end at the start of the "
                      "assistant turn, so the output starts inside the thought" if prefill_thought_header else "")
                   + ". Only the response is meant for the user.")
            matching = "matched exactly"
        else:
            fmt = (f"The output is `thought` + `{marker}` + `response`"
                   + (f"; the thought may start with `{header}`" + (" (the chat template already writes it at the "
                                                                     "start of the assistant turn)"
                                                                     if prefill_thought_header else "")
                      if header else "")
                   + ". Only the response is meant for the user.")
            matching = ("matched case-insensitively; `Here is` also appears as `Here's`, sometimes in markdown "
                        "emphasis")
        which = "first" if template.marker_wins == "first" else "last"
        strip = f"""
## Stripping the thought

Split at the **{which}** `{marker}` ({matching}). An output without the marker has no usable response.

```python
import re

MARKER = re.compile({template.response_pattern!r}, re.IGNORECASE | re.MULTILINE)

def split_thought(text):
    matches = list(MARKER.finditer(text))
    if not matches:
        return text.strip(), None          # no response: treat as a failed generation
    m = matches[{0 if which == "first" else -1}]
    return text[:m.start()].strip(), text[m.end():].strip()
```

With tpo-lite installed: `tpo_lite.parsing.parse_output(text, tpo_lite.prompts.get_template("{template.name}"))`.
"""
    serving = _serving_note(template, prefill_thought_header, think_tokens)
    sys_note = (f"\nThe chat template also inserts this system prompt when the conversation has none: "
                f"`{system_prompt}`\n" if system_prompt else "")
    kw_note = (f"\nThe seed template's variables were set to `{json.dumps(chat_template_kwargs)}` in training; the "
               "chat template uses these values unless you pass your own.\n" if chat_template_kwargs else "")
    return f"""---
library_name: transformers
tags: [tpo, thought-preference-optimization, tpo-lite]
---

# TPO model (merged)

Trained with [tpo-lite](https://arxiv.org/abs/2410.10630)-style Thought Preference Optimization: the model
writes a private thought before its response; only responses were judged during training.

* base model: `{base_model}`
* adapter merged: `{adapter}`
* thought template: `{template.name}`

## Prompt

The tokenizer's chat template wraps the **last user message** in the thought prompt automatically:

```
{template.wrapper}
```

so `tokenizer.apply_chat_template(messages, add_generation_prompt=True)` is all you need. Pass
`{THOUGHT_PROMPT_VAR}=False` to get the base's own, unwrapped prompt (the model then answers without thoughts, as
its base did).
{sys_note}{kw_note}
## Output format

{fmt}
{serving}{strip}"""


def _protected(adapter: Path, model_cfg, run_dir) -> list[tuple[Path, str]]:
    """What an export must never delete or write into: (path, what it is)."""
    out = [(adapter, "adapter being exported")]
    if run_dir is not None:
        out.append((Path(run_dir), "run directory"))
    run = RunDir(adapter.resolve().parent.parent)
    if run.iteration_of(adapter.resolve()) is not None:  # RUN/iter_XX/adapter: its run too
        out.append((run.path, "run directory of the adapter"))
    if model_cfg.path and os.path.exists(model_cfg.path):
        out.append((Path(model_cfg.path), "base model"))
    return out


def check_out_dir(out_dir: str | os.PathLike, protected: list[tuple[Path, str]], overwrite: bool) -> Path:
    """The resolved OUT_DIR, or a :class:`TpoError` if exporting there could destroy anything but a previous
    export (see the module docstring)."""
    shown = os.fspath(out_dir)
    if Path(out_dir).is_symlink():
        raise TpoError("is a symbolic link; give the folder itself", path=shown, field=_FIELD)
    out = Path(out_dir).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise TpoError("is the current directory or a folder above it, which the export would replace; give a "
                       "new folder such as ./exported", path=shown, field=_FIELD)
    # "is" before "contains" before "lies inside": the most telling message when several apply.
    for relation, hit in (("is the {what}", lambda p: out == p),
                          ("contains the {what} ({path})", lambda p: out in p.parents),
                          ("lies inside the {what} ({path})", lambda p: p in out.parents)):
        for path, what in protected:
            if hit(path.resolve()):
                raise TpoError(relation.format(what=what, path=path) + "; export into a folder of its own",
                               path=shown, field=_FIELD)
    if out.exists() and not out.is_dir():
        raise TpoError("exists and is not a folder", path=shown, field=_FIELD)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise TpoError("the output directory exists and is not empty (use --overwrite to replace a previous "
                           "export)", path=shown, field=_FIELD)
        if not (out / EXPORT_INFO).is_file():
            raise TpoError(f"is not a previous export (no {EXPORT_INFO} in it); --overwrite only replaces an "
                           "export, never another folder", path=shown, field=_FIELD)
    return out


def _own_sibling(out: Path, suffix: str) -> Path:
    """``out`` + ``suffix`` next to it, cleared if a crashed export left it; another folder there is refused."""
    p = out.with_name(out.name + suffix)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise TpoError("is in the way of the export; move it away", path=p, field=_FIELD)
    if p.exists():
        if any(p.iterdir()) and not ((p / _IN_PROGRESS).exists() or (p / EXPORT_INFO).exists()):
            raise TpoError("is in the way of the export and is not one of its leftovers; move it away", path=p,
                           field=_FIELD)
        shutil.rmtree(p)
    return p


def export_model(model_cfg, adapter: str | os.PathLike, out_dir: str | os.PathLike, prompt_cfg,
                 dtype: str | None = None, overwrite: bool = False,
                 run_dir: str | os.PathLike | None = None) -> Path:
    """Merge ``adapter`` into the base of ``model_cfg`` and save model, tokenizer (thought chat template),
    ``README.md`` and ``tpo_lite_export.json`` to ``out_dir``. Returns ``out_dir`` (resolved).

    ``prompt_cfg`` is the run's :class:`~tpo_lite.prompts.PromptConfig` (template, pre-fill, system prompt).
    ``dtype``: "float32", "bfloat16" or "float16" for the saved weights (default: the dtype the model loads
    in). ``run_dir``: the run the adapter comes from, protected like the adapter (see :func:`check_out_dir`;
    ``overwrite`` replaces only a previous export). The files are written to a temporary sibling directory that
    is renamed at the end, so an interrupted export leaves no half-written model behind.
    """
    import torch

    from tpo_lite.models import attach_adapter, check_adapter_dir, load_model, resolve_device, uses_4bit
    from tpo_lite.prompts import get_template

    template = get_template(prompt_cfg)
    adapter = Path(adapter)
    check_adapter_dir(adapter)
    out = check_out_dir(out_dir, _protected(adapter, model_cfg, run_dir), overwrite)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype is not None and dtype not in dtypes:
        raise TpoError(f"must be float32, bfloat16 or float16, got {dtype!r}", field="dtype")

    four_bit = uses_4bit(model_cfg, resolve_device(model_cfg.device))
    base, tokenizer = load_model(model_cfg)
    if four_bit:
        compute = getattr(base.config, "quantization_config", None)
        compute = getattr(compute, "bnb_4bit_compute_dtype", None) if compute is not None else None
        base = base.dequantize()  # W' = dequant(nf4(W)): the weights the adapter was trained against
        if dtype is None and isinstance(compute, torch.dtype):
            dtype = {v: k for k, v in dtypes.items()}.get(compute)
    model = attach_adapter(base, adapter)
    merged = model.merge_and_unload()
    target = dtypes[dtype] if dtype else next(merged.parameters()).dtype
    merged = merged.to(target)
    for p in merged.parameters():
        p.requires_grad_(False)

    kwargs = dict(getattr(prompt_cfg, "chat_template_kwargs", None) or {})
    tokenizer.chat_template = thought_chat_template(
        tokenizer.chat_template, template, prompt_cfg.prefill_thought_header, prompt_cfg.system_prompt, kwargs)

    tmp = _own_sibling(out, ".tmp-export")
    try:
        tmp.mkdir(parents=True)
        (tmp / _IN_PROGRESS).write_text("")
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(
            model_card(template, model_cfg.path, str(adapter), prompt_cfg.prefill_thought_header,
                       prompt_cfg.system_prompt, think_tags_are_tokens(tokenizer), kwargs), encoding="utf-8")
    except OSError as e:  # a full disk, a read-only folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise TpoError(f"cannot write the export: {e.strerror or e}", path=out, field=_FIELD) from None
    info = {
        "base_model": model_cfg.path, "adapter": str(adapter.resolve()), "template": template.name,
        "wrapper": template.wrapper, "thought_header": template.thought_header,
        "response_marker": template.response_marker, "marker_wins": template.marker_wins,
        "prefill_thought_header": bool(prompt_cfg.prefill_thought_header),
        "system_prompt": prompt_cfg.system_prompt, "chat_template_kwargs": kwargs,
        "dequantized_from_4bit": bool(four_bit),
        "dtype": str(target).replace("torch.", ""),
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    (tmp / _IN_PROGRESS).unlink()
    old = None
    if out.exists():  # an empty folder or a previous export (check_out_dir refused anything else)
        old = _own_sibling(out, ".old-export")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old)
    return out


def read_export_info(model_dir: str | os.PathLike) -> dict | None:
    """The export record of a model directory written by :func:`export_model`, or None."""
    p = Path(model_dir) / EXPORT_INFO
    if not p.is_file():
        return None
    try:
        info = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:  # also a UnicodeDecodeError
        raise TpoError(f"not valid JSON: {e}", path=p) from None
    if not isinstance(info, dict):
        raise TpoError(f"expected a JSON object, got {type(info).__name__}", path=p)
    for key in ("template", "wrapper"):
        if not isinstance(info.get(key), str):
            raise TpoError("missing or not a string (rerun `tpo-lite export`)", path=p, field=key)
    return info
