"""`tpo-lite chat` and `tpo-lite export`: use the trained model.

A TPO model only thinks when its prompt is wrapped in the thought template, so ``chat`` wraps every prompt
(and shows only the response unless asked), and ``export`` writes merged weights whose chat template does the
wrapping by itself. Bad input is printed as one ``error: ...`` line with exit status 2.
"""
from __future__ import annotations

import json
import os
import sys

import click

from .run_cmds import NulSafePath, _fail_cleanly, refuse_nul

_4BIT = click.Choice(["auto", "true", "false"])


def _model_cfg(model, dtype, load_in_4bit, device):
    from ..models import ModelConfig

    four = {"auto": "auto", "true": True, "false": False}[load_in_4bit]
    return ModelConfig(path=model, dtype=dtype, load_in_4bit=four, device=device)


def adapter_base_model(adapter: str) -> str:
    """The base model a peft adapter was trained on: ``base_model_name_or_path`` of its adapter_config.json, as
    peft's ``AutoPeftModel`` reads it; a TpoError (use --model) when it is missing or a path that is gone."""
    from ..errors import TpoError
    from ..models import check_adapter_dir

    cfg_path = check_adapter_dir(adapter) / "adapter_config.json"
    base = json.loads(cfg_path.read_text(encoding="utf-8")).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise TpoError("has no base_model_name_or_path: give the base model with --model", path=str(cfg_path),
                       field="--adapter")
    if os.path.isabs(os.path.expanduser(base)) and not os.path.exists(os.path.expanduser(base)):
        raise TpoError(f"names the base model {base}, which does not exist here: give it with --model",
                       path=str(cfg_path), field="--adapter")
    return base


def _from_run(ctx, run, model, dtype, load_in_4bit, device, template, prefill, system_prompt, adapter):
    """Resolve the model config, prompt config and adapter, from ``--run`` where given; options the user typed
    override the run's values. Returns (ModelConfig, PromptConfig, adapter path or None, RunConfig or None,
    run directory or None)."""
    import dataclasses

    from click.core import ParameterSource

    from ..prompts import PromptConfig

    refuse_nul(**{"--run": run, "--model": model, "--adapter": adapter, "--template": template})

    def typed(name):
        return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)

    if run is None and adapter is not None and not typed("model"):
        model = adapter_base_model(adapter)
    mcfg = _model_cfg(model, dtype, load_in_4bit, device)
    pcfg = PromptConfig(template=template or "generic", prefill_thought_header=prefill, system_prompt=system_prompt)
    if run is None:
        return mcfg, pcfg, adapter, None, None
    from ..stages import final_adapter
    from ..errors import TpoError
    from .run_cmds import _open

    config, run_dir = _open(run, (), None, None)
    mchanges = {f: getattr(mcfg, f) for f, opt in (("path", "model"), ("dtype", "dtype"),
                                                   ("load_in_4bit", "load_in_4bit"), ("device", "device"))
                if typed(opt)}
    mcfg = dataclasses.replace(config.model, **mchanges)
    pchanges = {f: getattr(pcfg, f) for f, opt in (("template", "template"),
                                                   ("prefill_thought_header", "prefill_thought_header"),
                                                   ("system_prompt", "system_prompt")) if typed(opt)}
    pcfg = dataclasses.replace(config.prompts, **pchanges)
    if adapter is None:
        adapter = final_adapter(run_dir, config)
        if adapter is None:
            raise TpoError("the run has no trained adapter yet", path=str(run_dir), field="--run")
    return mcfg, pcfg, adapter, config, run_dir


def _exported_template(info):
    """The thought template recorded in an exported model directory."""
    from ..prompts import BUILTIN, Template

    if info["template"] in BUILTIN and BUILTIN[info["template"]].wrapper == info["wrapper"]:
        return BUILTIN[info["template"]]
    return Template(name=info["template"], wrapper=info["wrapper"], thought_header=info.get("thought_header"),
                    response_marker=info.get("response_marker"), marker_wins=info.get("marker_wins", "first"))


def _prompts(argv_prompts):
    """Prompts from the command line, else stdin: line by line when piped, interactively on a terminal."""
    if argv_prompts:
        yield from argv_prompts
        return
    if sys.stdin.isatty():
        click.echo("Type a prompt and press Enter (Ctrl-D or 'exit' to quit).", err=True)
        while True:
            try:
                line = input("> ")
            except EOFError:
                click.echo(err=True)
                return
            if line.strip() in ("exit", "quit"):
                return
            if line.strip():
                yield line
    else:
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line.strip():
                yield line


@click.command("chat", context_settings={"max_content_width": 100})
@click.argument("prompt", nargs=-1)
@click.option("--run", "run", default=None, metavar="RUN_DIR|CONFIG.toml",
              help="Take the model, template, pre-fill, system prompt, max_new_tokens, thought_budget and the "
                   "final adapter from this run (options typed on the command line override them).")
@click.option("--model", default="smollm2", show_default=True,
              help="Base model: 'smollm2' (embedded default), an HF model directory (also one written by "
                   "`tpo-lite export`, whose chat template already wraps prompts) or a .gguf file. With --adapter "
                   "and no --model (nor --run): the adapter's base model (base_model_name_or_path in its "
                   "adapter_config.json, as peft's AutoPeftModel reads it).")
@click.option("--adapter", type=NulSafePath(exists=True, file_okay=False), default=None,
              help="LoRA adapter directory to put on the base (e.g. runs/NAME/iter_02/adapter).")
@click.option("--template", default=None,
              help="Thought template the model was trained with: generic, specific, specific_tags, think, direct or a "
                   ".toml file [default: generic; for an exported model, the template it was exported with].")
@click.option("--prefill-thought-header/--no-prefill-thought-header", default=False, show_default=True,
              help="Start the assistant turn with the template's thought header (use it if the run did).")
@click.option("--system-prompt", default=None, help="System message before the user turn (as in the run).")
@click.option("--show-thoughts", is_flag=True, help="Print the thought before the response.")
@click.option("--jsonl", is_flag=True,
              help="Print one JSON object per prompt (prompt, thought, response, valid, invalid_reason, "
                   "finish_reason, forced, text) instead of plain text.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=512, show_default=True,
              help="Token limit of one whole output (thought + response).")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.7, show_default=True,
              help="Sampling temperature; 0 = greedy.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=0.95, show_default=True,
              help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed; prompt n of the session uses a seed derived from it, so a session is reproducible.")
@click.option("--thought-budget", type=click.IntRange(min=1), default=None,
              help="Budget forcing: after this many thought tokens (or EOS) append the response marker and "
                   "sample the response.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help="Weight/compute dtype.")
@click.option("--load-in-4bit", type=_4BIT, default="false", show_default=True,
              help="Load the base in NF4 (bitsandbytes); 'auto' = on CUDA only.")
@click.option("--device", default="auto", show_default=True, help="Torch device (auto, cpu, cuda, cuda:1, ...).")
@click.pass_context
@_fail_cleanly
def chat_command(ctx, prompt, run, model, adapter, template, prefill_thought_header, system_prompt, show_thoughts, jsonl,
                 max_new_tokens, temperature, top_p, seed, thought_budget, dtype, load_in_4bit, device):
    """Talk to a TPO model: each PROMPT (or each line of stdin) is wrapped in the thought template, the model
    writes its thought and response, and the response is printed (the thought too with --show-thoughts).

    With no PROMPT arguments, prompts are read from stdin: line by line when it is a pipe or file
    (`echo "Name three colours" | tpo-lite chat --adapter runs/x/iter_02/adapter`), interactively on a
    terminal. Outputs without a parseable response are printed whole, with a note on stderr.
    """
    from ..errors import TpoError
    from ..export import read_export_info
    from ..memory import release
    from ..models import load_model
    from ..prompts import build_prompt, get_template
    from ..sampling import SamplingConfig, make_job, make_sampler
    from ..special_tokens import escape_special_tokens

    mcfg, pcfg, adapter, config, _ = _from_run(ctx, run, model, dtype, load_in_4bit, device, template,
                                               prefill_thought_header, system_prompt, adapter)
    if config is not None:  # the run's decoding limits unless typed
        from click.core import ParameterSource

        if ctx.get_parameter_source("max_new_tokens") == ParameterSource.DEFAULT:
            max_new_tokens = config.sampling.max_new_tokens
        if ctx.get_parameter_source("thought_budget") == ParameterSource.DEFAULT:
            thought_budget = config.sampling.thought_budget
    model = mcfg.path
    info = read_export_info(model) if os.path.isdir(model) else None
    if info is not None:
        tpl = _exported_template(info)
        if template is not None and template != tpl.name:
            raise TpoError(f"this model was exported with the {tpl.name!r} template, its chat template "
                           "applies it already", path=model, field="--template")
    else:
        tpl = get_template(pcfg)
    if max_new_tokens <= (thought_budget or 0):
        raise TpoError(f"must be below --max-new-tokens ({max_new_tokens})", field="--thought-budget")
    scfg = SamplingConfig(k=1, batch_size=1, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                          thought_budget=thought_budget, seed=seed)
    lm, tokenizer = load_model(mcfg, adapter=adapter)
    sampler = make_sampler(scfg, tokenizer, tpl if tpl.response_marker else None, model=lm, progress=False)
    del lm  # the sampler holds a merged sampling copy of a LoRA model: one set of weights for the session
    release()  # as the generate stage does: any cycle collected, the freed heap returned (malloc_trim)
    for n, text in enumerate(_prompts(prompt)):
        if info is not None:  # the exported chat template wraps, pre-fills and adds the system prompt itself
            # As build_prompt does: a prompt cannot forge a chat turn with special-token strings.
            messages = [{"role": "user", "content": escape_special_tokens(text, tokenizer, field="prompt")}]
            prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            prompt_text = build_prompt(tokenizer, text, tpl, prefill_thought_header=pcfg.prefill_thought_header,
                                       system_prompt=pcfg.system_prompt,
                                       chat_template_kwargs=pcfg.chat_template_kwargs)
        # The prompt -> job -> sample -> parse blocks of evaluate.model_outputs.
        job = make_job(f"chat-{n}", prompt_text, tokenizer, scfg)
        (_, (sample,)), = sampler.sample([job], 1)
        sample = sample.parsed(tpl)
        if jsonl:
            click.echo(json.dumps({"prompt": text, "thought": sample.thought, "response": sample.response,
                                   "valid": sample.valid, "invalid_reason": sample.invalid_reason,
                                   "finish_reason": sample.finish_reason, "forced": sample.forced,
                                   "text": sample.text}, ensure_ascii=False))
            continue
        response = sample.response
        if not sample.valid:
            note = {"truncated": f"cut at --max-new-tokens={max_new_tokens}",
                    "no_response_marker": "no response marker; printing the whole output",
                    "empty_response": "empty response"}.get(sample.invalid_reason, sample.invalid_reason)
            click.echo(f"[{note}]", err=True)
            if sample.invalid_reason == "no_response_marker":
                response = sample.text.strip()
        if show_thoughts and tpl.response_marker and sample.thought:
            click.echo("Thought:\n" + sample.thought + "\n\nResponse:")
        click.echo(response)
        click.echo()
        sys.stdout.flush()


@click.command("export", context_settings={"max_content_width": 100})
@click.argument("out_dir", type=NulSafePath(file_okay=False))
@click.option("--run", "run", default=None, metavar="RUN_DIR|CONFIG.toml",
              help="Take the model, template, pre-fill, system prompt and the final adapter from this run "
                   "(options typed on the command line override them).")
@click.option("--model", default="smollm2", show_default=True,
              help="Base model the adapter was trained on: 'smollm2', an HF model directory or a .gguf file. "
                   "Without --model (nor --run): base_model_name_or_path of the adapter's adapter_config.json.")
@click.option("--adapter", type=NulSafePath(exists=True, file_okay=False), default=None,
              help="LoRA adapter directory to merge (e.g. runs/NAME/iter_02/adapter); required without --run.")
@click.option("--template", default="generic", show_default=True,
              help="Thought template the model was trained with (generic, specific, specific_tags, think, direct or a "
                   ".toml file); the exported chat template applies it.")
@click.option("--prefill-thought-header/--no-prefill-thought-header", default=False, show_default=True,
              help="Make the chat template start the assistant turn with the thought header (as the run did).")
@click.option("--system-prompt", default=None,
              help="System message the chat template inserts when a conversation has none (as in the run).")
@click.option("--load-in-4bit", type=_4BIT, default="auto", show_default=True,
              help="How the base was loaded for training. With NF4 the base is loaded in 4-bit and dequantised "
                   "before merging, so the merged weights are exactly what the adapter was trained on. 'auto' "
                   "= as training decides (NF4 on CUDA, bf16/fp32 on the CPU).")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto",
              show_default=True, help="Dtype the base is loaded in for merging.")
@click.option("--save-dtype", type=click.Choice(["bfloat16", "float32", "float16"]), default=None,
              help="Dtype of the saved weights [default: the loading dtype].")
@click.option("--device", default="auto", show_default=True, help="Torch device used for merging.")
@click.option("--overwrite", is_flag=True,
              help="Replace OUT_DIR if it holds a previous export (its tpo_lite_export.json); any other non-empty "
                   "folder is refused, as is OUT_DIR being, containing or lying inside the run, the adapter or "
                   "the base model.")
@click.pass_context
@_fail_cleanly
def export_command(ctx, out_dir, run, model, adapter, template, prefill_thought_header, system_prompt, load_in_4bit, dtype,
                   save_dtype, device, overwrite):
    """Write a standalone model to OUT_DIR: the LoRA adapter merged into the base weights (peft
    merge_and_unload; dequantised first if the base was trained in 4-bit), the tokenizer with a chat template
    that wraps the last user message in the thought prompt by itself (`tpo_thought_prompt=False` turns it
    off), and a README model card explaining the output format, what splits it when served, and how to strip
    the thought.

    The result loads with plain transformers (AutoModelForCausalLM / AutoTokenizer) or vLLM, and
    `tpo-lite chat --model OUT_DIR` uses it directly.
    """
    from ..export import export_model
    from ..errors import TpoError
    from ..prompts import get_template

    refuse_nul(OUT_DIR=out_dir)
    mcfg, pcfg, adapter, _, run_dir = _from_run(ctx, run, model, dtype, load_in_4bit, device, template,
                                                prefill_thought_header, system_prompt, adapter)
    if adapter is None:
        raise TpoError("give --adapter (or --run to export a run's final adapter)", field="--adapter")
    get_template(pcfg)  # fail early on a bad template, before loading anything
    out = export_model(mcfg, adapter, out_dir, pcfg, dtype=save_dtype, overwrite=overwrite, run_dir=run_dir)
    click.echo(f"exported to {out}")
