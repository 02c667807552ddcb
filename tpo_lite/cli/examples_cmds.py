"""`tpo-lite examples`: copies the example run configs that ship with the package (like `axolotl fetch examples`)."""
from __future__ import annotations

import inspect
import shutil
import textwrap
from pathlib import Path

import click

from ..errors import TpoError
from .run_cmds import _fail_cleanly


def _summary(path: Path) -> str:
    """The first comment line of an example: what it runs."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@click.command("examples", context_settings={"max_content_width": 100})
@click.argument("dest", metavar="[DEST]", required=False, default="examples",
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--overwrite", is_flag=True,
              help="Replace example files that already exist in DEST. Without it an existing file is an error "
                   "and nothing is copied.")
@_fail_cleanly
def examples_command(dest, overwrite):
    """Copy the example run configs into DEST (default: ./examples), then run one with `tpo-lite run
    DEST/NAME.toml` (add --dry-run to see its plan first).

    The examples ship inside the package (the files of examples/ in the repository). Each starts with a comment
    saying what it runs and how; every option is explained by `tpo-lite run --list-options`.
    """
    from ..packaged import packaged_dir

    src = packaged_dir("examples")
    files = sorted(src.glob("*.toml")) if src is not None else []
    if not files:
        raise TpoError("this installation has no example configs (tpo_lite/examples is missing); reinstall "
                       "tpo-lite from its sdist or wheel")
    existing = [dest / f.name for f in files if (dest / f.name).exists()]
    if existing and not overwrite:
        raise TpoError(f"{len(existing)} of the {len(files)} examples already exist there ("
                       f"{', '.join(p.name for p in existing)}); nothing copied. Pass --overwrite to replace them "
                       "or choose another DEST", path=str(dest))
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copyfile(f, dest / f.name)
    click.echo(f"copied {len(files)} example configs to {dest}:")
    width = max(len(str(dest / f.name)) for f in files)
    for f in files:
        click.echo(f"  {str(dest / f.name):<{width}}  {_summary(f)}")


def _listing() -> str:
    from ..packaged import packaged_dir

    src = packaged_dir("examples")
    files = sorted(src.glob("*.toml")) if src is not None else []
    lines = [textwrap.fill(_summary(f), 96, initial_indent=f"  {f.name}: ", subsequent_indent="    ") for f in files]
    # \b: click keeps the lines of this paragraph as they are
    return "\b\nThe examples:\n" + "\n".join(lines) if files else ""


examples_command.help = f"{inspect.cleandoc(examples_command.help)}\n\n{_listing()}"
