"""OpenKBP patients into a flaxdose dataset: `convert_openkbp` (the CLI face is `python -m flaxdose.convert_openkbp`).

The dataset keeps the challenge's splits (`flaxdose.openkbp.format.SPLIT_FOLDERS`); its manifest
records the structures, whether the CT is kept, and the grid (`downsample_case`'s factor).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence

from tqdm import tqdm

from flaxdose.data.case import Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.openkbp.format import (
    OPENKBP_OARS,
    OPENKBP_SHAPE,
    OPENKBP_STRUCTURES,
    OPENKBP_TARGETS,
    find_patients,
    read_openkbp_patient,
)
from flaxdose.openkbp.grids import check_factor, downsample_case


def _manifest_extra(structures: Sequence[str], has_ct: bool, factor: int) -> dict:
    return {
        "source": "openkbp",
        "oars": [s for s in structures if s in OPENKBP_OARS],
        "targets": [s for s in structures if s in OPENKBP_TARGETS],
        "has_ct": bool(has_ct),
        "grid": {"shape": [n // factor for n in OPENKBP_SHAPE], "downsample": int(factor)},
    }


def convert_openkbp(
    src: str | os.PathLike,
    out: str | os.PathLike,
    structures: Sequence[str] = OPENKBP_STRUCTURES,
    include_ct: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    downsample: int = 1,
    splits: Mapping[str, Sequence[str]] | None = None,
) -> Dataset:
    """Convert OpenKBP patients under `src` into a flaxdose dataset (splits from the folders).

    `downsample` > 1 stores every case on the coarser grid of `downsample_case`; the
    manifest's ``grid`` records the factor. `include_ct` keeps the CT of the patients that
    have a ``ct.csv`` (the others are converted without one). `splits` (split name -> patient
    folder names, e.g. ``{"train": ["pt_1"], "val": ["pt_7"]}``): convert only those patients
    and give the dataset these splits instead of the folders' (a tuning split of train-pats);
    FlaxdoseError when a named patient is not under `src` or is named twice.
    """
    check_factor(downsample)
    patients = find_patients(src)
    if splits is None:
        splits = {}
        for split, folder in patients:
            splits.setdefault(split, []).append(folder.name)
    else:
        splits = {k: list(v) for k, v in splits.items()}
        named = [i for ids in splits.values() for i in ids]
        by_name = {folder.name: (split, folder) for split, folder in patients}
        unknown = sorted(set(named) - set(by_name))
        if unknown:
            raise FlaxdoseError(f"patients {unknown[:5]} are not under {src}; name pt_N folders it holds "
                                f"({len(by_name)} patients)")
        if len(set(named)) != len(named):
            raise FlaxdoseError(f"splits {sorted(splits)} name a patient twice; give every patient one split")
        patients = [by_name[i] for i in named]
    cases = (downsample_case(read_openkbp_patient(folder, structures, include_ct=include_ct), downsample)
             for _, folder in tqdm(patients, desc="converting", unit="patient", file=sys.stderr,
                                   disable=not progress))
    return write_dataset(out, cases, splits, overwrite=overwrite, extra=_manifest_extra(structures, include_ct, downsample))
