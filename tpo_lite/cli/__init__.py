"""`tpo-lite` command line. Each group of sub-commands lives in its own module and is registered here."""
import importlib

import click

# (module, command names) — imported lazily so `tpo-lite --help` stays fast and a broken optional
# dependency only breaks its own command. Command NAME is `NAME_command` in its module.
_COMMANDS = {
    "tpo_lite.cli.run_cmds": ["run", "generate", "judge", "pairs", "train"],
    "tpo_lite.cli.eval_cmds": ["eval", "report", "experiment", "seeds"],
    "tpo_lite.cli.model_cmds": ["chat", "export"],
    "tpo_lite.cli.bench_cmds": ["bench"],
    "tpo_lite.cli.examples_cmds": ["examples"],
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(name for names in _COMMANDS.values() for name in names)

    def get_command(self, ctx, name):
        for module, names in _COMMANDS.items():
            if name in names:
                return vars(importlib.import_module(module))[name.replace("-", "_") + "_command"]
        return None


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="tpo-lite")
def main():
    """Teach an instruction-tuned LLM to think before it answers (Thought Preference Optimization).

    The main job is `tpo-lite run CONFIG.toml`: sample K thought+response outputs per instruction, judge the
    responses only, build best-vs-worst pairs with length control, train DPO on a QLoRA adapter, repeat.
    Each stage also runs on its own (generate, judge, pairs, train). `eval` and `report` measure the result;
    `chat` and `export` use it; `bench kernels` times the fused kernels. `examples` copies the example
    configs out to start from.
    """
