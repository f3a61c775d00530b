"""Synthetic prostate VMAT plans in the paper's five planning styles: the built-in data.

The command line is `flaxdose.synth`.

Anatomy depends only on (seed, anatomy index) (`flaxdose.synthetic.anatomy`); the dose is
optimized per style (`flaxdose.synthetic.vmat`, styles in `flaxdose.synthetic.styles`) and normalized
so the PTV D95 equals the prescription (70 Gy in 28 fractions). Anatomy indices: a dataset's
training cases use 0..n_train-1 and its test cases TEST_ANATOMY_BASE + 0..n_test-1, so the
test patients are never anyone's training patients and every style generated with the same
seed shares patients (the source test cases are the first 10 external test cases, etc.).
See docs/synthetic_data.md.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from flaxdose.data.case import MANIFEST, PROSTATE_STRUCTURES, Case, Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.io import check_writable
from flaxdose.metrics import dvh_metrics, isodose_dice
from flaxdose.synthetic import anatomy as anat
from flaxdose.synthetic import vmat
from flaxdose.synthetic.styles import FRACTIONS, PAPER_SPLITS, PRESCRIPTION_GY, STYLE_TABLE, STYLES, Style

__all__ = [
    "PAPER_SPLITS",
    "STYLES",
    "TEST_ANATOMY_BASE",
    "ensure_dataset",
    "generate_case",
    "generate_cases",
    "beam_entrance_dose",
    "isodose_lobedness",
    "signature",
    "spike_contrast",
    "style_report",
]

GENERATOR = "flaxdose.synthetic"
GENERATOR_VERSION = 2  # bump whenever the plans a seed produces change: caches regenerate
# (Not for float32 rounding: issue 24's faster beam sum moved doses by <= 4e-5 Gy, masks identical,
# tests/test_synth_vmat.py; version 2 caches made before it stay valid and are reused as they are.)
TEST_ANATOMY_BASE = 5000  # test anatomies start here; training anatomies at 0
LOBE_LEVEL = 0.2  # the isodose (fraction of Rx) whose lobes tell the external style apart
LOBE_DIRECTIONS = 72  # axial directions (every 5 degrees) of the isodose radius
OARS = ("Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R")
SPIKE_RADIUS_MM = 80.0  # where spike_contrast samples: outside the PTV, inside any body
SPIKE_CLEARANCE_DEG = 25.0  # bath beams this far from every spike direction


def _check_style(style: str) -> None:
    if style not in STYLE_TABLE:
        raise FlaxdoseError(f"unknown style {style!r}; choose one of: {', '.join(STYLES)}")


def _check_count(n, what: str, minimum: int = 1) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < minimum:
        raise FlaxdoseError(f"{what} must be a whole number of cases >= {minimum}, got {n!r}")
    return int(n)


def case_id(style: str, seed: int, index: int) -> str:
    return f"{style}_{seed}_{index:04d}"


# ------------------------------------------------------------------ generation
def generate_case(style: str | Style, seed: int, index: int, scale: float = 1.0) -> Case:
    """The plan of anatomy (seed, index) in `style` (a name, or a `Style` such as a table
    style with one weight changed by `dataclasses.replace`) on the grid of `scale`."""
    if not isinstance(style, Style):
        _check_style(style)
    st = style if isinstance(style, Style) else STYLE_TABLE[style]
    grid = anat.grid_for_scale(scale)
    patient = anat.sample_anatomy(seed, index)
    angles = np.deg2rad(np.asarray(st.gantry_deg, np.float32))
    data = vmat.optimization_data(patient, angles, st.beam_profile)
    weights = {k: np.float32(v) for k, v in st.weights().items()}
    fluence, _ = vmat.optimize_fluence(angles, data, weights)
    if st.arc_sector_deg:  # the gantry moves while a control point delivers: two sub-angles
        half = np.deg2rad(st.arc_sector_deg / 4)
        angles = np.concatenate([angles - half, angles + half]).astype(np.float32)
        fluence = np.concatenate([fluence, fluence]) / 2
    ax, ay, az = grid.axes()
    dose = np.asarray(
        vmat.dose_on_grid(angles, fluence, np.asarray(patient.iso, np.float32), patient.body_ellipse(az), ax, ay, az)
    )
    masks = anat.structure_masks(patient, grid)
    # Clinics normalize the plan so 95 % of the PTV receives the prescription.
    d95 = dvh_metrics(dose, masks[0], grid.spacing_mm)["D95"]
    dose = (dose * np.float32(PRESCRIPTION_GY / d95)).astype(np.float32)
    return Case(
        case_id=case_id(st.name, seed, index),
        structures=PROSTATE_STRUCTURES,
        masks=masks,
        dose=dose,
        spacing_mm=grid.spacing_mm,
        origin_mm=grid.origin_mm,
        prescription_gy=PRESCRIPTION_GY,
        style=st.name,
        meta={
            "generator": GENERATOR,
            "generator_version": GENERATOR_VERSION,
            "seed": int(seed),
            "anatomy_index": int(index),
            "scale": float(scale),
            "fractions": FRACTIONS,
        },
    )


def _plan(args) -> Case:
    return generate_case(*args)


@contextlib.contextmanager
def _cpu_pool(workers: int):
    """A spawn-context process pool whose workers run JAX on the CPU (several processes must not
    each claim an accelerator's memory); the parent's environment is left as it was."""
    saved = os.environ.get("JAX_PLATFORMS")
    os.environ["JAX_PLATFORMS"] = "cpu"
    try:
        pool = multiprocessing.get_context("spawn").Pool(workers)
    finally:
        if saved is None:
            del os.environ["JAX_PLATFORMS"]
        else:
            os.environ["JAX_PLATFORMS"] = saved
    with pool:
        yield pool


def iter_cases(style: str, n: int, seed: int, scale: float = 1.0, start: int = 0, progress: bool = False,
               workers: int = 0, indices: Sequence[int] | None = None) -> Iterator[Case]:
    """Plans of anatomies start..start+n-1 (or the given `indices`), in order, one at a time (a full
    study does not fit in memory). `workers` > 1 plans them in that many CPU processes (same bytes)."""
    _check_style(style)
    indices = list(range(start, start + _check_count(n, "n"))) if indices is None else list(indices)
    anat.grid_for_scale(scale)  # fail before any work
    bar = dict(desc=f"{style} (seed {seed}, scale {scale:g})", unit="case", disable=not progress, total=len(indices))
    if workers > 1:
        with _cpu_pool(workers) as pool:
            yield from tqdm(pool.imap(_plan, [(style, seed, i, scale) for i in indices]), **bar)
    else:
        for index in tqdm(indices, **bar):
            yield generate_case(style, seed, index, scale)


def generate_cases(style: str, n: int, seed: int, scale: float = 1.0, start: int = 0, progress: bool = False) -> list[Case]:
    """Plans of anatomies start..start+n-1 in `style` (same seed and index: same patient in every style)."""
    return list(iter_cases(style, n, seed, scale, start, progress))


# ------------------------------------------------------------------ datasets
def _dataset_params(style: str, n_train: int, n_test: int, seed: int, scale: float) -> dict:
    return {
        "generator": GENERATOR,
        "generator_version": GENERATOR_VERSION,
        "style": style,
        "seed": int(seed),
        "scale": float(scale),
        "n_train": n_train,
        "n_test": n_test,
        "prescription_gy": PRESCRIPTION_GY,
        "fractions": FRACTIONS,
        "train_anatomies": [0, n_train],  # half-open ranges of anatomy indices
        "test_anatomies": [TEST_ANATOMY_BASE, TEST_ANATOMY_BASE + n_test],
    }


def _existing_params(root: Path) -> dict | None:
    try:
        return dict(Dataset.open(root).manifest.get("synth") or {})
    except FlaxdoseError:
        return None


def ensure_dataset(
    root: str | os.PathLike,
    style: str,
    n_train: int,
    n_test: int,
    seed: int = 0,
    scale: float = 1.0,
    progress: bool = True,
    overwrite: bool = False,
    workers: int = 0,
) -> Path:
    """The dataset of these parameters at `root`: reused if already there, else generated atomically.

    Splits are "train" and "test" (empty when `n_test` is 0). A `root` holding anything else
    is refused unless `overwrite`. `workers` > 1 plans the cases in that many CPU processes
    (the same bytes as one process). Raises FlaxdoseError for an unknown style, bad counts or scale.
    """
    _check_style(style)
    n_train, n_test = _check_count(n_train, "n_train"), _check_count(n_test, "n_test", minimum=0)
    if n_train > TEST_ANATOMY_BASE:
        raise FlaxdoseError(f"n_train must be at most {TEST_ANATOMY_BASE} (test anatomies start there), got {n_train}")
    anat.grid_for_scale(scale)
    root = Path(root)
    params = _dataset_params(style, n_train, n_test, seed, scale)
    if _existing_params(root) == params:
        return root
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise FlaxdoseError(
            f"{root} already holds other data (not the synthetic {style} dataset with seed {seed}, scale {scale:g}, "
            f"{n_train}/{n_test} cases); choose an empty folder, delete it, or pass --overwrite"
        )
    check_writable(root, overwrite, "dataset")  # --overwrite replaces an earlier dataset, never others' files
    train = (0, n_train)
    test = (TEST_ANATOMY_BASE, n_test)
    splits = {
        "train": [case_id(style, seed, i) for i in range(train[0], train[0] + train[1])],
        "test": [case_id(style, seed, i) for i in range(test[0], test[0] + test[1])],
    }

    indices = [*range(train[0], train[0] + train[1]), *range(test[0], test[0] + test[1])]
    cases = iter_cases(style, len(indices), seed, scale, progress=progress, workers=workers, indices=indices)

    write_dataset(root, cases, splits, overwrite=overwrite, extra={"synth": params})
    return root


def generate_study(root: str | os.PathLike, seed: int = 0, scale: float = 1.0, overwrite: bool = False, progress: bool = True) -> dict[str, Path]:
    """All five styles with the paper's Table 1 sizes, one dataset folder per style under `root`."""
    root = Path(root)
    out, times = {}, {}
    for style in STYLES:
        n_train, n_test = PAPER_SPLITS[style]
        t0 = time.perf_counter()
        out[style] = ensure_dataset(root / style, style, n_train, n_test, seed, scale, progress, overwrite)
        times[style] = (time.perf_counter() - t0) / (n_train + n_test)
        if progress:
            print(f"{style}: {n_train} train / {n_test} test in {out[style]} ({times[style]:.2f} s per case)", flush=True)
    return out


# ------------------------------------------------------------------ style signatures
def isodose_lobedness(case: Case, level: float = LOBE_LEVEL, directions: int = LOBE_DIRECTIONS) -> float:
    """Relative spread (std / mean) of the `level` isodose radius around the PTV centre.

    Measured in the axial slice through the PTV centroid: along each of `directions` rays
    from the centroid, the radius is where the dose first drops below level x Rx (or the ray
    leaves the body). A round or elliptic fall-off gives a small spread, beam spikes a large one.
    """
    ptv, body = case.mask("PTV"), case.mask("Body")
    cx, cy, cz = np.argwhere(ptv).mean(axis=0)
    k = int(round(cz))
    dose, inside = case.dose[:, :, k], body[:, :, k].astype(np.float32)
    dx, dy = case.spacing_mm[0], case.spacing_mm[1]
    step_mm = min(dx, dy) / 4
    r = np.arange(0, max(case.shape[:2]) * max(dx, dy), step_mm)
    phi = np.arange(directions) * 2 * np.pi / directions
    px = cx + np.cos(phi)[:, None] * r[None, :] / dx
    py = cy + np.sin(phi)[:, None] * r[None, :] / dy
    coords = np.stack([px.ravel(), py.ravel()])
    d = ndimage.map_coordinates(dose, coords, order=1, cval=0.0).reshape(px.shape)
    b = ndimage.map_coordinates(inside, coords, order=1, cval=0.0).reshape(px.shape)
    below = (d < level * case.prescription_gy) | (b < 0.5)
    radius = r[np.argmax(below, axis=1)]  # first sample below; rays never stay above to the grid edge
    return float(radius.std() / radius.mean())


def beam_entrance_dose(case: Case, gantry_deg: Sequence[float], radius_mm: float = SPIKE_RADIUS_MM) -> np.ndarray:
    """Dose (Gy) `radius_mm` upstream of the PTV centroid on each beam's central axis.

    Sampled (linear interpolation) in the axial slice through the PTV centroid. Gantry
    angles are IEC: 0 enters anteriorly (-y), 90 from the patient's left (+x), as in
    `flaxdose.synthetic.vmat.beam_geometry`.
    """
    cx, cy, cz = np.argwhere(case.mask("PTV")).mean(axis=0)
    theta = np.deg2rad(np.asarray(gantry_deg, float))
    dx, dy = case.spacing_mm[0], case.spacing_mm[1]
    px, py = cx + np.sin(theta) * radius_mm / dx, cy - np.cos(theta) * radius_mm / dy
    return ndimage.map_coordinates(case.dose[:, :, int(round(cz))], np.stack([px, py]), order=1)


def spike_contrast(case: Case, radius_mm: float = SPIKE_RADIUS_MM) -> float:
    """Mean dose on the external style's spike-beam axes over that on its bath-beam axes.

    Bath beams are the external style's beams at least SPIKE_CLEARANCE_DEG from any spike
    direction (beams closer share the spikes' field edges). About 1 for an arc; > 1 where
    the plan's intermediate dose reaches out along the spike directions.
    """
    external = STYLE_TABLE["external"]
    angles, strong = np.asarray(external.gantry_deg), np.asarray(external.beam_profile) > 1.0
    off = np.min(np.abs((angles[:, None] - angles[strong][None] + 180.0) % 360.0 - 180.0), axis=1)
    spikes, bath = angles[strong], angles[off >= SPIKE_CLEARANCE_DEG]
    return float(beam_entrance_dose(case, spikes, radius_mm).mean() / beam_entrance_dose(case, bath, radius_mm).mean())


def signature(case: Case) -> dict[str, float]:
    """Per-case numbers of the style report, doses in % of the prescription."""
    rx = case.prescription_gy
    ptv = dvh_metrics(case.dose, case.mask("PTV"), case.spacing_mm)
    out = {"PTV D95": 100 * ptv["D95"] / rx, "PTV D2": 100 * ptv["D2"] / rx}
    for oar in OARS:
        out[f"{oar} mean"] = 100 * dvh_metrics(case.dose, case.mask(oar), case.spacing_mm)["Dmean"] / rx
    out["dose outside body"] = float(np.abs(case.dose[~case.mask("Body")]).max(initial=0.0))
    out["lobedness"] = isodose_lobedness(case)
    out["spike contrast"] = spike_contrast(case)
    return out


def _femoral_mean(sig: Mapping[str, float]) -> float:
    return 0.5 * (sig["Femur_Head_L mean"] + sig["Femur_Head_R mean"])


def style_report(cases: Mapping[str, Sequence[Case]]) -> dict[str, dict[str, float]]:
    """Mean signatures per style, with Dice and ratios against source on the shared anatomies.

    Per style: the mean of every `signature` entry, "PTV D2 max", "femoral SD" (SD over the
    cases of the mean dose of both femoral heads, % of Rx); on the anatomies shared with
    source: "Dice vs source" (mean isodose Dice 10..100 %, source plan as the prediction of
    this style's plan: what a perfect source model would score), "Dice vs source dice_<L>"
    per level and its worst level "Dice vs source, worst level", and ratios "<organ> vs
    source" of the mean doses, "femoral SD vs source", "lobedness vs source".
    Cases are matched across styles by (seed, anatomy index, grid) from their meta.
    """
    key = lambda c: (c.meta.get("seed"), c.meta.get("anatomy_index"), c.shape)
    sig = {(style, key(c)): signature(c) for style, style_cases in cases.items() for c in style_cases}
    source = {key(c): c for c in cases.get("source", ())}
    mean = lambda sigs, names: float(np.mean([sum(s[n] for n in names) for s in sigs]))
    femoral_sd = lambda sigs: float(np.std([_femoral_mean(s) for s in sigs], ddof=1)) if len(sigs) > 1 else float("nan")
    report = {}
    for style, style_cases in cases.items():
        sigs = [sig[style, key(c)] for c in style_cases]
        row = {name: float(np.mean([s[name] for s in sigs])) for name in sigs[0]} if sigs else {}
        if sigs:
            row["PTV D2 max"] = float(np.max([s["PTV D2"] for s in sigs]))
            row["femoral SD"] = femoral_sd(sigs)
        row["n"] = len(style_cases)
        pairs = [(c, source[key(c)]) for c in style_cases if key(c) in source]
        row["n_shared"] = len(pairs)
        if pairs:
            dice = [isodose_dice(c.dose, s.dose, s.prescription_gy, body=s.mask("Body")) for c, s in pairs]
            row["Dice vs source"] = float(np.mean([d["mean"] for d in dice]))
            levels = [k for k in dice[0] if k != "mean"]
            for level in levels:
                row[f"Dice vs source {level}"] = float(np.mean([d[level] for d in dice]))
            row["Dice vs source, worst level"] = min(row[f"Dice vs source {level}"] for level in levels)
            ref = [sig["source", key(s)] for _, s in pairs]
            mine = [sig[style, key(c)] for c, _ in pairs]
            for label, names in (
                ("Bladder", ["Bladder mean"]),
                ("Rectum", ["Rectum mean"]),
                ("Femoral heads", ["Femur_Head_L mean", "Femur_Head_R mean"]),
                ("lobedness", ["lobedness"]),
            ):
                row[f"{label} vs source"] = mean(mine, names) / mean(ref, names)
            row["femoral SD vs source"] = femoral_sd(mine) / femoral_sd(ref) if len(pairs) > 1 else float("nan")
        report[style] = row
    return report


def load_study(root: str | os.PathLike) -> dict[str, list[Case]]:
    """Cases of every style dataset under `root` (a study folder, or one dataset folder)."""
    root = Path(root)
    folders = [root] if (root / MANIFEST).is_file() else sorted(p for p in root.iterdir() if (p / MANIFEST).is_file()) if root.is_dir() else []
    if not folders:
        raise FlaxdoseError(f"{root} holds no flaxdose datasets; generate one with --out or --study first")
    out: dict[str, list[Case]] = {}
    for folder in folders:
        ds = Dataset.open(folder)
        for ids in ds.splits.values():
            for cid in ids:
                case = ds.load(cid)
                out.setdefault(case.style, []).append(case)
    order = {s: i for i, s in enumerate(STYLES)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


def format_report(report: Mapping[str, Mapping[str, float]]) -> str:
    cols = [
        ("n", "n", "{:.0f}"),
        ("PTV D95", "D95%", "{:.1f}"),
        ("PTV D2", "D2%", "{:.1f}"),
        ("Bladder mean", "Blad", "{:.1f}"),
        ("Rectum mean", "Rect", "{:.1f}"),
        ("Femur_Head_L mean", "FemL", "{:.1f}"),
        ("Femur_Head_R mean", "FemR", "{:.1f}"),
        ("PTV D2 max", "D2max", "{:.1f}"),
        ("femoral SD", "FemSD", "{:.2f}"),
        ("lobedness", "lobe", "{:.3f}"),
        ("spike contrast", "spike", "{:.2f}"),
        ("Dice vs source", "Dice", "{:.3f}"),
        ("Dice vs source, worst level", "Dice-min", "{:.3f}"),
        ("Bladder vs source", "Blad/src", "{:.2f}"),
        ("Rectum vs source", "Rect/src", "{:.2f}"),
        ("Femoral heads vs source", "Fem/src", "{:.2f}"),
        ("femoral SD vs source", "FSD/src", "{:.2f}"),
        ("lobedness vs source", "lobe/src", "{:.2f}"),
    ]
    lines = ["style       " + " ".join(f"{h:>8s}" for _, h, _ in cols)]
    for style, row in report.items():
        cells = [fmt.format(row[k]) if k in row else "-" for k, _, fmt in cols]
        lines.append(f"{style:12s}" + " ".join(f"{c:>8s}" for c in cells))
    lines.append(
        "doses in % of the prescription (OAR: mean dose); lobe = relative spread of the "
        f"{round(100 * LOBE_LEVEL)} % isodose radius; spike = dose on the external spike-beam axes / bath-beam axes "
        f"{SPIKE_RADIUS_MM:g} mm from the PTV centre; FemSD = SD over cases of the femoral-head mean dose; "
        "Dice = mean isodose Dice (10..100 %, body) against source on the same anatomies (the source plan as the "
        "prediction: a perfect source model), Dice-min = its worst isodose level; x/src = ratio to source on the "
        "same anatomies"
    )
    return "\n".join(lines)
