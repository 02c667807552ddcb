"""Rows of a Hugging Face ``datasets`` source, for training instructions (``loop.train_instructions``) and eval
sets (``eval.eval_set``).

A source that is not a JSON / JSONL file (those tpo-lite reads itself, with line numbers in its errors) is one of:

* a local data file ``datasets`` reads: ``.parquet``, ``.csv``, ``.tsv``, ``.arrow``;
* a directory: written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``, or a folder of data files;
* a Hub id (``HuggingFaceH4/ultrafeedback_binarized``): downloaded once into the HF cache; offline
  (``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``, or no network) it is read from the cache.

``datasets`` is an optional extra (``pip install 'tpo-lite[datasets]'``): it is imported here only, and only
for such a source. Every failure is one :class:`TpoError` naming the source and the option.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import TpoError

NATIVE_SUFFIXES = (".json", ".jsonl")
# suffix -> datasets' packaged builder (and its arguments)
FILE_BUILDERS = {".parquet": ("parquet", {}), ".csv": ("csv", {}), ".tsv": ("csv", {"delimiter": "\t"}),
                 ".arrow": ("arrow", {})}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
INSTALL_HINT = "pip install 'tpo-lite[datasets]' (or pip install datasets)"


def is_native(source: str | os.PathLike) -> bool:
    """A JSON / JSONL file: read by tpo-lite itself, never through ``datasets``. That is a ``.json`` /
    ``.jsonl`` path, or an existing file whose suffix is not one of :data:`FILE_BUILDERS`."""
    p = Path(source)
    if p.is_dir():
        return False
    return p.suffix.lower() in NATIVE_SUFFIXES or (p.is_file() and p.suffix.lower() not in FILE_BUILDERS)


def _import_datasets(source: str, option: str):
    try:
        import datasets
    except ImportError:
        raise TpoError(f"is not a JSON/JSONL file, so it is read with the `datasets` library, which is not "
                       f"installed: {INSTALL_HINT}", path=source, field=option) from None
    return datasets


def _saved_by_datasets(p: Path) -> bool:
    return (p / "dataset_dict.json").is_file() or (p / "state.json").is_file()


def _load(datasets, source: str, option: str):
    p = Path(source)
    if p.is_dir():
        return datasets.load_from_disk(str(p)) if _saved_by_datasets(p) else datasets.load_dataset(str(p))
    if p.is_file():  # a data file (is_native took every other file)
        builder, kwargs = FILE_BUILDERS[p.suffix.lower()]
        return datasets.load_dataset(builder, data_files=str(p), **kwargs)
    if not _HUB_ID.match(source) or p.suffix.lower() in FILE_BUILDERS:
        raise TpoError("not found (neither a file, a directory nor a Hub dataset id like 'org/name')", path=source,
                       field=option)
    try:
        return datasets.load_dataset(source)
    except Exception as e:  # noqa: BLE001 -- datasets raises many types; all mean "cannot get it here"
        cache = datasets.config.HF_DATASETS_CACHE
        offline = " (offline mode is on)" if datasets.config.HF_HUB_OFFLINE else ""
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TpoError(f"no local file or directory of that name, and the Hub dataset could not be loaded from the "
                       f"Hub{offline} nor from the HF cache {cache}: {first}. Offline, download it once where there "
                       "is a network (the cache is reused with HF_DATASETS_OFFLINE=1), or pass a local file or a "
                       "save_to_disk directory", path=source, field=option) from None


def _pick_split(ds, split: str, source: str, option: str, split_option: str):
    if not hasattr(ds, "keys"):  # a Dataset: one split already
        return ds
    names = list(ds.keys())
    if split:
        if split not in ds:
            raise TpoError(f"the dataset has no split {split!r} (it has: {', '.join(names)})", path=source,
                           field=split_option)
        return ds[split]
    if len(names) == 1:
        return ds[names[0]]
    raise TpoError(f"the dataset has several splits ({', '.join(names)}): choose one with {split_option}",
                   path=source, field=split_option)


def load_rows(source: str, split: str = "", option: str = "source", split_option: str = "split") -> list[dict]:
    """The rows of ``source`` (see the module docstring) as dicts, in dataset order: split ``split`` of a
    dataset with several (empty = its only split). A null cell is left out of its row (a missing value).
    ``option`` / ``split_option`` name the config options in errors."""
    source = os.fspath(source)
    datasets = _import_datasets(source, option)
    try:
        ds = _load(datasets, source, option)
    except TpoError:
        raise
    except Exception as e:  # noqa: BLE001 -- a local file or directory datasets cannot read
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise TpoError(f"`datasets` cannot read it: {first}", path=source, field=option) from None
    ds = _pick_split(ds, split, source, option, split_option)
    return [{k: v for k, v in row.items() if v is not None} for row in ds]
