"""Files that ship with the package but live once, at the repo root: the kernel sources (``csrc/``) and the
example run configs (``examples/``).

setup.py maps them to ``tpo_lite/csrc`` and ``tpo_lite/examples`` in the sdist and the wheel (no second copy
is checked in). :func:`packaged_dir` finds them in the installed package first, then in the repo checkout.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

PACKAGE_DIR = Path(__file__).resolve().parent


def packaged_dir(name: str) -> Optional[Path]:
    """``tpo_lite/NAME`` of an installed package, else ``NAME/`` of the checkout this package runs from, else None.

    The checkout is only looked at when the package's parent holds setup.py: an installed package's parent is
    site-packages, where a folder of the same name would belong to someone else.
    """
    installed = PACKAGE_DIR / name
    if installed.is_dir():
        return installed
    root = PACKAGE_DIR.parent
    if (root / "setup.py").is_file() and (root / name).is_dir():
        return root / name
    return None
