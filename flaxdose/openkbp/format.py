"""The OpenKBP challenge's files (Babier et al., Med Phys 2021): axis order, sparse CSVs, patients, submissions.

Layout (`provided-data/` of ababier/open-kbp): one folder per patient (`pt_<n>`) under
`train-pats`, `validation-pats`, `test-pats`. Every volume is 128 x 128 x 128; each `*.csv`
is sparse with header `,data` and rows `flat_index,value` (flat index in C order). ROI
files list indices only; `dose.csv` is Gy; `ct.csv` is CT number + 1000;
`possible_dose_mask.csv` marks voxels that may receive dose; `voxel_dimensions.csv` holds
three sizes in mm (in-plane, in-plane, slice).

Axis order: an OpenKBP array a[i, j, k] runs i anterior->posterior, j right->left and k
superior->inferior (checked on the anatomy: spinal cord posterior of the mandible, left
parotid at larger j, brainstem at smaller k than the cord). Cases are stored in flaxdose's
LPS [x, y, z] order: ``vol = a.transpose(1, 0, 2)[:, :, ::-1]``; `to_openkbp` inverts it.
OpenKBP carries no patient coordinates, so `origin_mm` is (0, 0, 0).

Splits: `train-pats` -> "train", `validation-pats` -> "val" (the split flaxdose's trainer
validates on and selects its best checkpoint with), `test-pats` -> "test".

The challenge's rule for the possible-dose mask: a prediction is multiplied by it before it
is saved (`provided_code/network_functions.py`); `write_openkbp_dose` and `write_submission`
do so.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import Case
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_file, atomic_folder
from flaxdose.metrics import OPENKBP_OAR_NAMES, OPENKBP_TARGET_NAMES

OPENKBP_SHAPE = (128, 128, 128)
OPENKBP_OARS = OPENKBP_OAR_NAMES
OPENKBP_TARGETS = OPENKBP_TARGET_NAMES
OPENKBP_STRUCTURES = OPENKBP_OARS + OPENKBP_TARGETS  # the challenge's channel order
TARGET_PRESCRIPTION_GY = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
SPLIT_FOLDERS = {"train-pats": "train", "validation-pats": "val", "test-pats": "test"}
CT_OFFSET = 1000.0  # ct.csv holds HU + 1000


def from_openkbp(volume: np.ndarray) -> np.ndarray:
    """OpenKBP array order -> flaxdose [x, y, z] (LPS)."""
    return np.ascontiguousarray(np.asarray(volume).transpose(1, 0, 2)[:, :, ::-1])


def to_openkbp(volume: np.ndarray) -> np.ndarray:
    """flaxdose [x, y, z] (LPS) -> OpenKBP array order (inverse of `from_openkbp`)."""
    return np.ascontiguousarray(np.asarray(volume)[:, :, ::-1].transpose(1, 0, 2))


def read_sparse_csv(path: str | os.PathLike, shape: Sequence[int] = OPENKBP_SHAPE):
    """(flat C-order indices, values or None for an index-only ROI file) of one OpenKBP CSV."""
    path = Path(path)
    try:
        with open(path) as f:
            header = f.readline().strip()
            first = f.readline().strip()
        with open(path, "rb") as f:  # the challenge's files end with a line end; a cut file does not
            f.seek(max(path.stat().st_size - 1, 0))
            truncated = bool(first) and f.read(1) != b"\n"
    except FileNotFoundError:
        raise FlaxdoseError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise FlaxdoseError(f"cannot read {path} ({e}); it is not an OpenKBP CSV") from None
    if header.replace(" ", "") != ",data":
        raise FlaxdoseError(f"{path}: header is {header[:40]!r}, not ',data'; it is not an OpenKBP sparse CSV")
    if truncated:
        raise FlaxdoseError(f"{path}: the last row has no line end; the file is truncated (copy it again)")
    size = int(np.prod(shape))
    if not first:
        return np.zeros(0, np.int64), None
    has_values = len(first.split(",")) > 1 and first.split(",")[1].strip() != ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if has_values:
                table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
                raw, values = table[:, 0], table[:, 1]
            else:
                raw = np.loadtxt(path, delimiter=",", skiprows=1, usecols=0, dtype=np.float64, ndmin=1)
                values = None
    except ValueError as e:
        raise FlaxdoseError(f"{path}: malformed row ({e}); expected 'flat_index,value' rows") from None
    if not np.isfinite(raw).all() or (raw != np.round(raw)).any() or raw.min(initial=0) < 0 or raw.max(initial=0) >= size:
        raise FlaxdoseError(f"{path}: flat indices must be integers in [0, {size}); the file is damaged")
    if values is not None and not np.isfinite(values).all():
        raise FlaxdoseError(f"{path}: values must be finite numbers")
    return raw.astype(np.int64), values


def _dense(indices, values, shape, fill=0.0, dtype=np.float32) -> np.ndarray:
    out = np.full(int(np.prod(shape)), fill, dtype)
    out[indices] = 1 if values is None else values
    return out.reshape(shape)


def read_openkbp_patient(
    folder: str | os.PathLike,
    structures: Sequence[str] = OPENKBP_STRUCTURES,
    include_ct: bool = True,
    style: str = "openkbp",
) -> Case:
    """One OpenKBP patient folder as a `Case` (structures as channels, absent ROIs empty).

    Keeps the possible-dose mask; the CT (HU) when `include_ct` and present; the dose when
    present (the challenge's hidden test patients have none). The prescription is that of
    the highest target present (PTV70 -> 70 Gy).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FlaxdoseError(f"OpenKBP patient folder {folder} does not exist")
    vd_path = folder / "voxel_dimensions.csv"
    try:
        spacing_a = np.loadtxt(vd_path, dtype=np.float64, ndmin=1)
    except FileNotFoundError:
        raise FlaxdoseError(f"{folder} has no voxel_dimensions.csv; it is not an OpenKBP patient folder") from None
    except ValueError as e:
        raise FlaxdoseError(f"{vd_path}: {e}; expected three voxel sizes in mm") from None
    if spacing_a.shape != (3,) or not (np.isfinite(spacing_a).all() and (spacing_a > 0).all()):
        raise FlaxdoseError(f"{vd_path} must hold three positive voxel sizes (mm), got {spacing_a}")
    unknown = [s for s in structures if s not in OPENKBP_STRUCTURES]
    if unknown:
        raise FlaxdoseError(f"unknown OpenKBP structures {unknown}; choose from {list(OPENKBP_STRUCTURES)}")
    masks = []
    for name in structures:
        path = folder / f"{name}.csv"
        if path.exists():
            idx, _ = read_sparse_csv(path)
            masks.append(from_openkbp(_dense(idx, None, OPENKBP_SHAPE, 0, bool)))
        else:
            masks.append(np.zeros(OPENKBP_SHAPE, bool))
    pdm_path = folder / "possible_dose_mask.csv"
    if not pdm_path.exists():
        raise FlaxdoseError(f"{folder} has no possible_dose_mask.csv; it is not an OpenKBP patient folder")
    idx, _ = read_sparse_csv(pdm_path)
    possible = from_openkbp(_dense(idx, None, OPENKBP_SHAPE, 0, bool))
    dose = None
    if (folder / "dose.csv").exists():
        idx, values = read_sparse_csv(folder / "dose.csv")
        if values is None and idx.size:
            raise FlaxdoseError(f"{folder / 'dose.csv'} has no dose values")
        dose = from_openkbp(_dense(idx, values, OPENKBP_SHAPE))
    ct = None
    if include_ct and (folder / "ct.csv").exists():
        idx, values = read_sparse_csv(folder / "ct.csv")
        ct = from_openkbp(_dense(idx, values, OPENKBP_SHAPE)) - np.float32(CT_OFFSET)
    present = [s for s, m in zip(structures, masks) if s in TARGET_PRESCRIPTION_GY and m.any()]
    rx = max((TARGET_PRESCRIPTION_GY[s] for s in present), default=max(TARGET_PRESCRIPTION_GY.values()))
    if dose is not None:
        check_target_dose(folder, dose, {s: m for s, m in zip(structures, masks) if s in present})
    return Case(
        case_id=folder.name,
        structures=tuple(structures),
        masks=np.stack(masks),
        dose=dose,
        spacing_mm=(float(spacing_a[1]), float(spacing_a[0]), float(spacing_a[2])),
        origin_mm=(0.0, 0.0, 0.0),
        prescription_gy=rx,
        style=style,
        ct=ct,
        possible_dose_mask=possible,
        meta={
            "source": "openkbp",
            "rois_present": [s for s, m in zip(structures, masks) if m.any()],
            "oars": [s for s in structures if s in OPENKBP_OARS],
            "targets": [s for s in structures if s in OPENKBP_TARGETS],
            "origin_note": "OpenKBP has no patient coordinates; origin_mm is arbitrary",
        },
    )


def check_target_dose(folder: Path, dose: np.ndarray, targets: dict[str, np.ndarray]) -> None:
    """Refuse a plan dose that cannot be a whole plan: a target with unirradiated voxels, or a
    target's median dose below half its level (PTV70: 35 Gy). A damaged or cut dose.csv reads
    as such a dose, and it would train and score as a real plan. Raises FlaxdoseError."""
    for name, mask in targets.items():
        covered = float((dose[mask] > 0).mean())
        median = float(np.median(dose[mask]))
        if covered < 0.99 or median < 0.5 * TARGET_PRESCRIPTION_GY[name]:
            raise FlaxdoseError(
                f"{folder / 'dose.csv'}: {name} has dose in {covered:.0%} of its voxels, median {median:.1f} Gy "
                f"(prescription {TARGET_PRESCRIPTION_GY[name]:g} Gy); the dose file is damaged or not the plan dose"
            )


def write_openkbp_dose(dose: Case | np.ndarray, path: str | os.PathLike, possible_dose_mask=None) -> Path:
    """Write an [x, y, z] dose as an OpenKBP submission CSV (`,data` + `index,value` rows).

    As the challenge's own code does, the dose is multiplied by the possible-dose mask
    (taken from the Case, or given) and only non-zero voxels are written. A dose with NaN or
    infinite voxels is refused (a NaN would read back as 0 Gy, an inf as "inf").
    """
    if isinstance(dose, Case):
        possible_dose_mask = dose.possible_dose_mask if possible_dose_mask is None else possible_dose_mask
        dose = dose.dose
    dose = np.asarray(dose, np.float64)
    if dose.shape != OPENKBP_SHAPE:
        raise FlaxdoseError(f"an OpenKBP dose must be {OPENKBP_SHAPE}, got {dose.shape}")
    bad = ~np.isfinite(dose)
    if bad.any():
        raise FlaxdoseError(f"the dose for {path} holds {int(bad.sum())} NaN or infinite voxel(s); nothing was "
                            "written: fix or rerun the prediction that made it")
    if possible_dose_mask is not None:
        dose = dose * np.asarray(possible_dose_mask, bool)
    flat = to_openkbp(dose).ravel()
    idx = np.flatnonzero(flat > 0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path, "w") as f:
        f.write(",data\n")
        np.savetxt(f, np.column_stack([idx, flat[idx]]), fmt=["%d", "%.6g"], delimiter=",")
    return path


def find_patients(root: str | os.PathLike) -> list[tuple[str, Path]]:
    """(split, folder) of every `pt_*` folder under `root` (a split folder or provided-data)."""
    root = Path(root)
    if not root.is_dir():
        raise FlaxdoseError(f"{root} does not exist; pass the OpenKBP provided-data folder")
    key = lambda p: (int(re.sub(r"\D", "", p.name) or 0), p.name)
    out = []
    if root.name.startswith("pt_"):
        return [(SPLIT_FOLDERS.get(root.parent.name, "all"), root)]
    direct = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("pt_")), key=key)
    if direct:
        return [(SPLIT_FOLDERS.get(root.name, root.name), p) for p in direct]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        split = SPLIT_FOLDERS.get(sub.name, sub.name)
        out += [(split, p) for p in sorted(sub.iterdir(), key=key) if p.is_dir() and p.name.startswith("pt_")]
    if not out:
        raise FlaxdoseError(f"no OpenKBP patient folders (pt_*) under {root}")
    return out


def write_submission(predictions: Sequence[Case], folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """The challenge's submission format: one sparse `<case_id>.csv` per patient, in `folder`.

    Written atomically (nothing half-written on failure); see `write_openkbp_dose`.
    """
    with atomic_folder(folder, overwrite) as tmp:
        for case in predictions:
            write_openkbp_dose(case, tmp / f"{case.case_id}.csv")
    return Path(folder)
