"""Resolve `config.data` to a dataset folder: a user's folder, or built-in data generated on first use.

Built-in data is cached under `data.cache_dir` (default `<workdir>/data`) and reused by
later runs with the same settings.
"""

from __future__ import annotations

from pathlib import Path

from flaxdose.data.case import Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.synthetic import generator as synth
from flaxdose.synthetic.phantom import phantom_cases

KINDS = ("synthetic", "phantom", "folder")


def resolve_dataset(data_cfg, workdir: str | Path) -> Dataset:
    """The dataset `config.data` names: `kind` "folder" opens `data.path`; "synthetic" and
    "phantom" generate the built-in data once under `data.cache_dir` (default `<workdir>/data`).

    Raises FlaxdoseError for an unknown `kind`, a "folder" without `path`, or a folder that is
    not a flaxdose dataset.
    """
    kind = data_cfg.kind
    if kind == "folder":
        if not data_cfg.path:
            raise FlaxdoseError("data.kind='folder' needs data.path, the dataset folder (with manifest.json)")
        return Dataset.open(data_cfg.path)
    cache = Path(data_cfg.cache_dir or Path(workdir) / "data")
    if kind == "synthetic":
        name = f"{data_cfg.style}_scale{data_cfg.scale:g}_seed{data_cfg.seed}_{data_cfg.n_train}-{data_cfg.n_test}"
        root = synth.ensure_dataset(
            cache / name, data_cfg.style, data_cfg.n_train, data_cfg.n_test, seed=data_cfg.seed, scale=data_cfg.scale
        )
        return Dataset.open(root)
    if kind == "phantom":
        return _phantom_dataset(cache, data_cfg)
    raise FlaxdoseError(f"unknown data.kind {kind!r}; choose one of {KINDS}")


def _phantom_dataset(cache: Path, data_cfg) -> Dataset:
    shape = tuple(data_cfg.phantom_shape)
    root = cache / f"phantom_{'x'.join(map(str, shape))}_seed{data_cfg.seed}_{data_cfg.n_train}-{data_cfg.n_test}"
    if (root / "manifest.json").is_file():
        return Dataset.open(root)
    cases = phantom_cases(data_cfg.seed, data_cfg.n_train + data_cfg.n_test, shape=shape)
    ids = [c.case_id for c in cases]
    return write_dataset(root, cases, {"train": ids[: data_cfg.n_train], "test": ids[data_cfg.n_train :]})
