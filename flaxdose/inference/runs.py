"""A training run's folder as inference reads it: its config.json, its dataset, the cases it trained on, its
training voxel spacing when its checkpoints predate stored spacings.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flaxdose import config as config_lib
from flaxdose.checkpoint import find_checkpoint
from flaxdose.data.case import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.spacing import spacing_record

log = logging.getLogger("flaxdose")


def run_config_file(path: str | Path, which: str = "best") -> Path:
    """The config.json of the training run that holds `path` (a workdir or a checkpoint inside one).

    Raises FlaxdoseError when there is no checkpoint under `path` or no config.json above it.
    """
    from flaxdose.inference.package import is_package

    if is_package(path):  # a package has weights and metadata, no run to read data or checkpoints from
        raise FlaxdoseError(f"{path} is a model package: it holds the model, not its training run (no dataset, no "
                            "checkpoints); pass --data DIR for the cases, or use the training workdir it was exported "
                            "from")
    directory, _ = find_checkpoint(Path(path), which)
    config_file = next((p / "config.json" for p in [directory, *directory.parents] if (p / "config.json").is_file()), None)
    if config_file is None:
        raise FlaxdoseError(f"no config.json next to the checkpoint {directory}; pass the training workdir")
    return config_file


def run_dataset(path: str | Path) -> Path:
    """The dataset folder the run at `path` (a workdir or a checkpoint inside one) trained on.

    A folder dataset (``data.kind == "folder"``) is its ``data.path``; built-in data is the
    run's cache (`flaxdose.data.builtin.resolve_dataset`, regenerated only if it was deleted).
    Raises FlaxdoseError when the run's dataset folder no longer exists.
    """
    from flaxdose.data.builtin import resolve_dataset

    config_file = run_config_file(path, "latest")
    config = config_lib.load_config_json(config_file)
    if config.data.kind == "folder" and not (Path(config.data.path) / "manifest.json").is_file():
        raise FlaxdoseError(f"the run {config_file.parent} trained on {config.data.path}, which is gone; pass --data DIR")
    return Path(resolve_dataset(config.data, config_file.parent).root)


def trained_cases(path: str | Path) -> tuple[Dataset, list[str]]:
    """The dataset the run at `path` trained on (`run_dataset`) and the ids of the cases it saw: its
    training split (or ``data.train_cases``), validation cases included (they picked its checkpoint)."""
    config = config_lib.load_config_json(run_config_file(path, "latest"))
    dataset = Dataset.open(run_dataset(path))
    seen = list(config.data.get("train_cases") or ()) or dataset.split(config.data.train_split)
    return dataset, seen + (dataset.split("val") if "val" in dataset.splits else [])


def recovered_spacing(path: str | Path) -> dict:
    """The training spacing record (`spacing_record`) of the run at `path` (a workdir or a checkpoint in
    one) from its training data, for a checkpoint that does not store it (trained before flaxdose
    stored `SPACING_KEY`). Built-in synthetic data: the grid of its ``data.scale`` (no data
    generated); any other data: the headers of its training cases (`trained_cases`, without the
    "val" split, as training records them). Raises FlaxdoseError when the data cannot be read.
    """
    config = config_lib.load_config_json(run_config_file(path, "latest"))
    try:
        if config.data.kind == "synthetic":
            from flaxdose.synthetic.anatomy import grid_for_scale

            return spacing_record([grid_for_scale(config.data.scale).spacing_mm])
    except (AttributeError, KeyError) as e:
        raise FlaxdoseError(f"its config.json has no data.{e}") from None
    dataset, seen = trained_cases(path)
    val = set(dataset.split("val")) if "val" in dataset.splits else set()
    return spacing_record(dataset.case_spacing_mm(i) for i in seen if i not in val)


