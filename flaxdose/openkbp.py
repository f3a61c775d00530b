"""The OpenKBP challenge (Babier et al., Med Phys 2021): format, conversion, grids, submissions, scores.

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

The challenge's rules for the possible-dose mask: a prediction is multiplied by it before
it is saved (`provided_code/network_functions.py`), and the dose score averages over its
voxels. `predict_openkbp` does both; a model trained on a coarser grid (`downsample_case`)
is scored on the challenge's own 128^3 grid against the original doses (`upsample_dose`).
The CLI face is `python -m flaxdose.convert_openkbp`.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from flaxdose.data.case import Case, Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_file, atomic_folder
from flaxdose.metrics import OPENKBP_OAR_NAMES, OPENKBP_TARGET_NAMES, openkbp_case_scores

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


def _progress(items, desc: str, progress: bool):
    if not progress:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="patient", file=sys.stderr)


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
) -> Dataset:
    """Convert OpenKBP patients under `src` into a flaxdose dataset (splits from the folders).

    `downsample` > 1 stores every case on the coarser grid of `downsample_case`; the
    manifest's ``grid`` records the factor.
    """
    check_factor(downsample)
    patients = find_patients(src)
    splits: dict[str, list[str]] = {}
    for split, folder in patients:
        splits.setdefault(split, []).append(folder.name)
    cases = (downsample_case(read_openkbp_patient(folder, structures, include_ct=include_ct), downsample)
             for _, folder in _progress(patients, "converting", progress))
    return write_dataset(out, cases, splits, overwrite=overwrite, extra=_manifest_extra(structures, include_ct, downsample))


# ---------------------------------------------------------------- coarser grids
def dataset_downsample(dataset: Dataset) -> int:
    """The grid factor a converted OpenKBP dataset was written with (1: the challenge's grid)."""
    return int(dataset.manifest.get("grid", {}).get("downsample", 1))


def training_downsample(data_cfg) -> int:
    """The grid factor a run trained on: its config's ``data.downsample``.

    Checked against the manifest of the training dataset (``data.path``) when that is at
    hand: a model scored on another grid than it learned would give wrong scores, not an
    error. Raises FlaxdoseError when they disagree.
    """
    factor = int(data_cfg.get("downsample", 1))
    path = data_cfg.get("path") or ""
    if path and (Path(path) / "manifest.json").is_file():
        recorded = dataset_downsample(Dataset.open(path))
        if recorded != factor:
            raise FlaxdoseError(f"the run trained on {path}, a grid downsampled {recorded}x, but its config says "
                                f"data.downsample={factor}; retrain with --config.data.downsample={recorded}")
    check_factor(factor)
    return factor


def check_factor(factor: int) -> None:
    if not isinstance(factor, (int, np.integer)) or factor < 1 or OPENKBP_SHAPE[0] % factor:
        raise FlaxdoseError(f"the downsampling factor must be a whole divisor of 128 (1, 2, 4, ...), got {factor!r}")


def _blocks(volume: np.ndarray, factor: int) -> np.ndarray:
    """(X, Y, Z) -> (X/f, Y/f, Z/f, f^3): the fine voxels of every coarse voxel."""
    x, y, z = (n // factor for n in volume.shape)
    v = volume.reshape(x, factor, y, factor, z, factor).transpose(0, 2, 4, 1, 3, 5)
    return v.reshape(x, y, z, factor**3)


def downsample_case(case: Case, factor: int) -> Case:
    """`case` on the grid `factor` times coarser along every axis (128^3 -> 64^3 for 2).

    A coarse voxel covers f x f x f fine voxels. It belongs to a structure, and to the
    possible-dose mask, when any of its fine voxels does (small OARs never vanish). Its
    dose is the mean over its fine voxels inside the possible-dose mask (the reference dose
    is zero outside the mask, so a plain mean would dilute the dose at the skin); the CT is
    the plain mean. Spacing grows f-fold; the origin moves to the centre of the first coarse
    voxel. Factor 1 returns `case` itself. Raises FlaxdoseError unless f divides the grid.
    """
    if factor == 1:
        return case
    if any(n % factor for n in case.shape):
        raise FlaxdoseError(f"case {case.case_id!r}: grid {case.shape} is not divisible by the factor {factor}")
    inside = case.possible_dose_mask if case.possible_dose_mask is not None else np.ones(case.shape, bool)
    coarse_inside = _blocks(inside, factor).any(-1)
    dose = None
    if case.dose is not None:
        counts = _blocks(inside, factor).sum(-1)
        sums = _blocks(np.where(inside, case.dose, 0.0).astype(np.float64), factor).sum(-1)
        dose = np.where(counts > 0, sums / np.maximum(counts, 1), 0.0).astype(np.float32)
    spacing = np.asarray(case.spacing_mm)
    return case.replace(
        masks=np.stack([_blocks(m, factor).any(-1) for m in case.masks]),
        dose=dose,
        ct=None if case.ct is None else _blocks(case.ct, factor).mean(-1),
        possible_dose_mask=None if case.possible_dose_mask is None else coarse_inside,
        spacing_mm=tuple(spacing * factor),
        origin_mm=tuple(np.asarray(case.origin_mm) + (factor - 1) / 2 * spacing),
        meta={**case.meta, "downsample": int(factor)},
    )


def upsample_dose(coarse: np.ndarray, factor: int, possible_dose_mask: np.ndarray, order: int = 3) -> np.ndarray:
    """A coarse-grid dose (Gy) back on the fine grid of `possible_dose_mask`, zero outside the mask.

    The inverse of `downsample_case` for doses: spline interpolation of order `order`
    (scipy.ndimage.zoom, grid_mode: coarse voxel centres sit at the centres of their fine
    blocks) normalized by the interpolated coarse possible-dose mask, so coarse voxels
    outside the mask do not pull the dose at the skin towards zero. A fine voxel where that
    normalization is too weak gets its coarse voxel's value. Returns float32 (X, Y, Z).
    """
    from scipy import ndimage

    fine = np.asarray(possible_dose_mask, bool)
    coarse = np.asarray(coarse, np.float64)
    if factor == 1:
        return (coarse * fine).astype(np.float32)
    if tuple(n * factor for n in coarse.shape) != fine.shape:
        raise FlaxdoseError(f"a {coarse.shape} dose upsampled {factor}x does not fit the grid {fine.shape}")
    weight = _blocks(fine, factor).any(-1)
    if not weight.any():
        return np.zeros(fine.shape, np.float32)
    # Outside the mask's bounding box (grown by one coarse voxel of zeros) both interpolated
    # volumes are zero, so interpolating inside it alone gives the same values, faster.
    points = np.argwhere(weight)
    box = tuple(slice(max(lo - 1, 0), hi + 2) for lo, hi in zip(points.min(0), points.max(0)))
    fine_box = tuple(slice(b.start * factor, min(b.stop, n) * factor) for b, n in zip(box, weight.shape))
    w, c = weight[box].astype(np.float64), coarse[box]
    zoom = lambda v: ndimage.zoom(v, factor, order=order, mode="nearest", grid_mode=True)
    numerator, denominator = zoom(c * w), zoom(w)
    nearest = c.repeat(factor, 0).repeat(factor, 1).repeat(factor, 2)
    dose = np.zeros(fine.shape, np.float32)
    dose[fine_box] = np.where(denominator > 0.25, numerator / np.maximum(denominator, 0.25), nearest).clip(0.0, None)
    return dose * fine


def crop_box(case: Case, minimum: Sequence[int] | None = None) -> tuple[slice, slice, slice]:
    """The box (x, y, z slices) around the possible-dose mask and every structure of `case`.

    Grown symmetrically (within the grid) to at least `minimum` voxels per axis, e.g. a
    model's window, so a network never sees a smaller input than it was trained on.
    """
    occupied = case.masks.any(axis=0)
    if case.possible_dose_mask is not None:
        occupied |= case.possible_dose_mask
    if not occupied.any():
        return tuple(slice(0, n) for n in case.shape)
    points = np.argwhere(occupied)
    box = []
    for lo, hi, n, want in zip(points.min(0), points.max(0) + 1, case.shape, minimum or (0, 0, 0)):
        size = min(max(hi - lo, int(want)), n)
        start = min(max(0, lo - (size - (hi - lo)) // 2), n - size)
        box.append(slice(int(start), int(start + size)))
    return tuple(box)


def predict_openkbp(model, cases: Sequence[Case], factor: int = 1, progress: bool = False) -> list[Case]:
    """Each case's predicted dose on the challenge's grid, masked by its possible-dose mask.

    `model` is anything with ``predict(cases) -> cases`` (`flaxdose.inference.Model`, the
    `flaxdose.inference.baseline` reference); it sees each case on the grid `factor` times coarser it
    was trained on, cropped to `crop_box` (grown to the model's ``window``, if it has one:
    dose outside the possible-dose mask is never scored, so windows of empty air are
    skipped), and its dose is brought back with `upsample_dose`. Returns copies of `cases`
    whose `dose` is the prediction (float32 Gy).
    """
    out = []
    for case in _progress(list(cases), "predicting", progress):
        if case.possible_dose_mask is None:
            raise FlaxdoseError(f"case {case.case_id!r} has no possible-dose mask; convert it from OpenKBP CSVs")
        coarse = downsample_case(case, factor)
        box = crop_box(coarse, getattr(model, "window", None))
        origin = np.asarray(coarse.origin_mm) + np.asarray(coarse.spacing_mm) * [b.start for b in box]
        cropped = coarse.replace(masks=coarse.masks[(slice(None), *box)], possible_dose_mask=coarse.possible_dose_mask[box],
                                 dose=None if coarse.dose is None else coarse.dose[box],
                                 ct=None if coarse.ct is None else coarse.ct[box], origin_mm=tuple(origin))
        predicted = np.zeros(coarse.shape, np.float32)
        predicted[box] = model.predict([cropped])[0].dose
        dose = upsample_dose(predicted, factor, case.possible_dose_mask)
        out.append(case.replace(dose=dose, meta={**case.meta, "predicted_by": getattr(model, "name", "model")}))
    return out


# ---------------------------------------------------------------- submissions and scores
def write_submission(predictions: Sequence[Case], folder: str | os.PathLike, overwrite: bool = False) -> Path:
    """The challenge's submission format: one sparse `<case_id>.csv` per patient, in `folder`.

    Written atomically (nothing half-written on failure); see `write_openkbp_dose`.
    """
    with atomic_folder(folder, overwrite) as tmp:
        for case in predictions:
            write_openkbp_dose(case, tmp / f"{case.case_id}.csv")
    return Path(folder)


class Scores(NamedTuple):
    """The challenge's scores of one model, with the tables they come from."""

    summary: dict  # dose_score (mean over patients), dvh_score (pooled), num_cases
    patients: list[dict]  # case_id, dose_score, dvh_score (that patient's metrics), num_metrics
    metrics: list[dict]  # case_id, roi, metric, reference_gy, predicted_gy, error_gy (predicted - reference)


def score_predictions(predictions: Sequence[Case], references: Sequence[Case]) -> Scores:
    """Dose score and DVH score as `flaxdose.metrics.openkbp_scores`, per patient and overall."""
    if len(predictions) != len(references) or not references:
        raise FlaxdoseError(f"need one prediction per reference case, got {len(predictions)} and {len(references)}")
    patients, metrics = [], []
    for pred, ref in zip(predictions, references):
        if pred.case_id != ref.case_id:
            raise FlaxdoseError(f"prediction {pred.case_id!r} is scored against {ref.case_id!r}; keep one order")
        dose_score, ref_m, new_m = openkbp_case_scores(pred.dose, ref)
        errors = [new_m[k] - ref_m[k] for k in ref_m]
        patients.append({"case_id": ref.case_id, "dose_score": dose_score,  # no ROI voxels: no DVH score (None)
                         "dvh_score": float(np.mean(np.abs(errors))) if errors else None,
                         "num_metrics": len(errors)})
        metrics += [{"case_id": ref.case_id, "roi": k.split(" ")[0], "metric": k.split(" ")[1],
                     "reference_gy": ref_m[k], "predicted_gy": new_m[k], "error_gy": e} for k, e in zip(ref_m, errors)]
    if not metrics:
        raise FlaxdoseError("no reference case has a voxel in an OAR or target; the OpenKBP DVH score is undefined")
    summary = {
        "dose_score": float(np.mean([p["dose_score"] for p in patients])),
        "dvh_score": float(np.mean([abs(m["error_gy"]) for m in metrics])),
        "num_cases": len(patients),
    }
    return Scores(summary, patients, metrics)
