"""Export the trained model: LoRA merged into the base weights, plus a chat template that applies the thought
prompt by itself and a model card that says how to split the output.

A TPO model only thinks when its prompt is wrapped in the thought template it was trained with. The exported
tokenizer's chat template therefore wraps the **last user message** in that template (and, if the run pre-filled
the assistant turn with the thought header, appends the header after the generation prompt), so any
``apply_chat_template`` user -- transformers pipelines, vLLM, TGI -- gets thoughts without knowing about TPO.
Pass ``enable_thinking=False`` to ``apply_chat_template`` (the variable Qwen3 uses for the same purpose) to get
the original, unwrapped prompt. Earlier user turns are left as they are (the model was trained on single turns
and earlier assistant turns hold responses only).

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

EXPORT_INFO = "tpo_lite_export.json"


def _jinja_str(text: str) -> str:
    # A Jinja string literal: Jinja decodes backslash escapes like Python, and json.dumps (ASCII only)
    # produces exactly such escapes.
    return json.dumps(text, ensure_ascii=True)


def thought_chat_template(base_template: str, template, prefill_thought_header: bool = False,
                          system_prompt: str | None = None) -> str:
    """A chat template that renders exactly what :func:`tpo_lite.prompts.build_prompt` builds.

    ``base_template`` is the model's own chat template; ``template`` the thought :class:`~tpo_lite.prompts
    .Template`. The result wraps the last user message with ``template.wrap``; inserts ``system_prompt`` as a
    system message when the conversation has none; appends the thought header after the generation prompt
    when ``prefill_thought_header``. All of it only while ``enable_thinking`` is undefined or true.
    """
    if not base_template:
        raise TpoError("the tokenizer has no chat template to extend", field="model.path")
    prefix, suffix = template.wrapper.split("{instruction}")
    on = "(enable_thinking is not defined or enable_thinking)"
    # No whitespace between tags and no whitespace-control dashes: nothing of the base template's own
    # leading/trailing text may be stripped.
    pre = (
        "{# tpo-lite: wrap the last user message in the thought prompt (enable_thinking=false turns it off) #}"
        f"{{% if {on} %}}"
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


def model_card(template, base_model: str, adapter: str, prefill_thought_header: bool,
               system_prompt: str | None) -> str:
    """The README.md of an exported model: output format, how to strip the thought, provenance."""
    marker = template.response_marker
    header = template.thought_header
    if marker is None:
        fmt = ("This model was exported with the `direct` template: there is no thought section, the whole "
               "output is the response.")
        strip = ""
    else:
        fmt = (f"The output is `thought` + `{marker}` + `response`"
               + (f"; the thought may start with `{header}`" + (" (the chat template already writes it at the "
                                                                 "start of the assistant turn)"
                                                                 if prefill_thought_header else "")
                  if header else "")
               + ". Only the response is meant for the user.")
        which = "first" if template.marker_wins == "first" else "last"
        strip = f"""
## Stripping the thought

Split at the **{which}** `{marker}` (matched case-insensitively; `Here is` also appears as `Here's`,
sometimes in markdown emphasis). An output without the marker has no usable response.

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
        if template.name == "generic":
            strip += ("\nThe generic markers are the ones IBM Granite models use, so vLLM's `granite` reasoning "
                      "parser (`vllm serve ... --reasoning-parser granite`) splits the output too.\n")
    sys_note = (f"\nThe chat template also inserts this system prompt when the conversation has none: "
                f"`{system_prompt}`\n" if system_prompt else "")
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
`enable_thinking=False` to get the unwrapped prompt (the model then answers without thoughts, as its base did).
{sys_note}
## Output format

{fmt}
{strip}"""


def export_model(model_cfg, adapter: str | os.PathLike, out_dir: str | os.PathLike, prompt_cfg,
                 dtype: str | None = None, overwrite: bool = False) -> Path:
    """Merge ``adapter`` into the base of ``model_cfg`` and save model, tokenizer (thought chat template),
    ``README.md`` and ``tpo_lite_export.json`` to ``out_dir``. Returns ``out_dir``.

    ``prompt_cfg`` is the run's :class:`~tpo_lite.prompts.PromptConfig` (template, pre-fill, system prompt).
    ``dtype``: "float32", "bfloat16" or "float16" for the saved weights (default: the dtype the model loads
    in). The files are written to a temporary sibling directory that is renamed at the end, so an interrupted
    export leaves no half-written model behind.
    """
    import torch
    from peft import PeftModel

    from tpo_lite.models import load_model, resolve_device, uses_4bit
    from tpo_lite.prompts import get_template

    template = get_template(prompt_cfg)
    adapter = Path(adapter)
    if not (adapter / "adapter_config.json").is_file():
        raise TpoError("not a peft adapter directory (no adapter_config.json)", path=adapter, field="adapter")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise TpoError("the output directory exists and is not empty (use --overwrite)", path=out)
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
    model = PeftModel.from_pretrained(base, str(adapter))
    merged = model.merge_and_unload()
    target = dtypes[dtype] if dtype else next(merged.parameters()).dtype
    merged = merged.to(target)
    for p in merged.parameters():
        p.requires_grad_(False)

    tokenizer.chat_template = thought_chat_template(
        tokenizer.chat_template, template, prompt_cfg.prefill_thought_header, prompt_cfg.system_prompt)

    tmp = out.with_name(out.name + ".tmp-export")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    merged.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "README.md").write_text(
        model_card(template, model_cfg.path, str(adapter), prompt_cfg.prefill_thought_header,
                   prompt_cfg.system_prompt), encoding="utf-8")
    info = {
        "base_model": model_cfg.path, "adapter": str(adapter.resolve()), "template": template.name,
        "wrapper": template.wrapper, "thought_header": template.thought_header,
        "response_marker": template.response_marker, "marker_wins": template.marker_wins,
        "prefill_thought_header": bool(prompt_cfg.prefill_thought_header),
        "system_prompt": prompt_cfg.system_prompt, "dequantized_from_4bit": bool(four_bit),
        "dtype": str(target).replace("torch.", ""),
    }
    (tmp / EXPORT_INFO).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_export_info(model_dir: str | os.PathLike) -> dict | None:
    """The export record of a model directory written by :func:`export_model`, or None."""
    p = Path(model_dir) / EXPORT_INFO
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TpoError(f"not valid JSON: {e}", path=p) from None
