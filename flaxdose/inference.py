"""Inference: a trained model as an object that predicts dose for cases.

`Model` holds the architecture, parameters, the structures it expects and its training
patch size; build it from a workdir (`Model.load`) or from a config and parameters
(`Model.from_config`). Prediction runs sliding windows of the training patch size with
50 % overlap and Gaussian blending, so the network always sees inputs like those it was
trained on: with GroupNorm, a whole-volume pass normalizes over a different extent than
the training patches and shifts the dose (``window=None`` still does that, for
comparison). Dose is clipped at 0, converted from units of the prescription to Gy, and
zeroed outside the case's dose region (`Case.dose_region`: the body, or OpenKBP's
possible-dose mask).

A run stores the voxel spacing of its training cases with every checkpoint
(`SPACING_KEY`, see `spacing_record`); `Model.predict` refuses a case whose spacing is more
than `SPACING_TOLERANCE` off it on any axis (`check_spacing`; a range of training spacings is
first widened, see `accepted_spacing`): the network learned dose fall-offs in voxels, so on
another spacing its dose is wrong in scale, not merely noisy.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from flaxdose import config as config_lib
from flaxdose.checkpoint import CHECKPOINTS, find_checkpoint, restore_params, saved_steps
from flaxdose.convolution import resolve_form
from flaxdose.data.case import Case, Dataset, with_all_split, write_dataset
from flaxdose.data.pipeline import lr_swap_permutation, model_inputs
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation import each_case
from flaxdose.io import check_writable
from flaxdose.model import UNet3D, UNetSpec, init_params

log = logging.getLogger("flaxdose")


def run_config_file(path: str | Path, which: str = "best") -> Path:
    """The config.json of the training run that holds `path` (a workdir or a checkpoint inside one).

    Raises FlaxdoseError when there is no checkpoint under `path` or no config.json above it.
    """
    from flaxdose.package import is_package

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


@functools.lru_cache(maxsize=16)  # one compiled function per model, however many Models use it
def make_predict_fn(spec: UNetSpec) -> Callable:
    """jit-compiled (params, uint8 or float inputs (N, X, Y, Z, C)) -> (N, X, Y, Z) dose / prescription;
    ``model.conv="auto"`` takes the fastest forward-only convolution form (`resolve_form`)."""
    spec = dataclasses.replace(spec, conv=resolve_form(spec.conv, inference=True))
    return jax.jit(lambda params, inputs: UNet3D(spec).apply({"params": params}, inputs.astype(jnp.float32)))


def window_starts(size: int, window: int, overlap: float) -> list[int]:
    """Window offsets along one axis: stride window*(1-overlap), the last window flush with the end."""
    if window >= size:
        return [0]
    stride = max(1, int(window * (1 - overlap)))
    starts = list(range(0, size - window + 1, stride))
    return starts if starts[-1] == size - window else [*starts, size - window]


def gaussian_weights(window: Sequence[int], sigma_fraction: float = 0.125) -> np.ndarray:
    """Blending weights peaking at the window centre (edges, with the least context, count least)."""
    axes = [np.exp(-0.5 * ((np.arange(n) - (n - 1) / 2) / max(n * sigma_fraction, 1e-6)) ** 2) for n in window]
    weights = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    return np.maximum(weights / weights.max(), 1e-3).astype(np.float32)


def sliding_window(run, volume: np.ndarray, window: Sequence[int], overlap: float = 0.5, batch_size: int = 1) -> np.ndarray:
    """Predict a (X, Y, Z, C) `volume` window by window and blend the windows.

    `run` maps (B, *window, C) inputs to (B, *window) outputs; windows of at most `window`
    voxels overlap by `overlap` along each axis (`window_starts`) and are blended with
    `gaussian_weights`. Returns float32 (X, Y, Z) in `run`'s units.
    """
    shape = volume.shape[:3]
    window = tuple(min(w, n) for w, n in zip(window, shape))
    corners = [(i, j, k) for i in window_starts(shape[0], window[0], overlap)
               for j in window_starts(shape[1], window[1], overlap) for k in window_starts(shape[2], window[2], overlap)]
    weights = gaussian_weights(window)
    total, norm = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for chunk in range(0, len(corners), batch_size):
        members = corners[chunk : chunk + batch_size]
        slices = [tuple(slice(c, c + w) for c, w in zip(corner, window)) for corner in members]
        crops = np.stack([volume[s] for s in slices])
        if len(members) < batch_size:  # one batch shape: one compilation
            crops = np.concatenate([crops, np.zeros((batch_size - len(members), *crops.shape[1:]), crops.dtype)])
        predicted = np.asarray(run(crops))
        for row, s in enumerate(slices):
            total[s] += predicted[row] * weights
            norm[s] += weights
    return total / norm


# ---------------------------------------------------------------- voxel spacing
SPACING_KEY = "train_spacing_mm"  # checkpoint meta: {"min": [x, y, z], "max": [x, y, z]} (mm)
SPACING_TOLERANCE = 0.05  # relative, per axis


def spacing_record(spacings: Iterable[Sequence[float]]) -> dict:
    """What a run stores of its training cases' voxel spacings ((x, y, z) mm each): the per-axis
    range, ``{"min": [x, y, z], "max": [x, y, z]}`` (min == max when every case has one spacing).
    Raises FlaxdoseError for no spacings."""
    values = np.array([tuple(float(v) for v in s) for s in spacings], np.float64).reshape(-1, 3)
    if not len(values):
        raise FlaxdoseError("no training cases to record the voxel spacing of")
    return {"min": [round(float(v), 6) for v in values.min(0)], "max": [round(float(v), 6) for v in values.max(0)]}


def describe_spacing(record: Mapping | Sequence[float]) -> str:
    """``4x4x3`` (mm) for one spacing (x, y, z) or a record whose min equals its max, ``3.5-4x3.5-4x2.5``
    for a range (per axis)."""
    if not isinstance(record, Mapping):
        record = {"min": record, "max": record}
    return "x".join(f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}" for lo, hi in zip(record["min"], record["max"]))


def accepted_spacing(record: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(lowest, highest) voxel size (x, y, z) mm a model trained on the range `record` (`spacing_record`)
    accepts, per axis: ``min / sqrt(max / min) x (1 - SPACING_TOLERANCE)`` to ``max x sqrt(max / min)
    x (1 + SPACING_TOLERANCE)``, i.e. +-5 % around one training spacing; a range of them is first
    widened by half its own width in ratio. A model trained across spacings cannot tell them
    apart (it sees masks, not millimetres), so its error at the range's ends is already of the
    order of the range: OpenKBP trains on 1.95-5.08 mm in x and validates up to 5.42 mm."""
    lo, hi = np.asarray(record["min"], np.float64), np.asarray(record["max"], np.float64)
    widen = np.sqrt(hi / lo)
    return lo / widen * (1 - SPACING_TOLERANCE), hi * widen * (1 + SPACING_TOLERANCE)


def spacing_fits(spacing_mm: Sequence[float], record: Mapping) -> bool:
    """Whether a voxel size (x, y, z) mm lies within `accepted_spacing(record)` on every axis."""
    spacing = np.asarray(spacing_mm, np.float64)
    lo, hi = accepted_spacing(record)
    return bool(np.all(spacing >= lo) and np.all(spacing <= hi))


def field_of_view_shape(spacing_mm: Sequence[float]) -> tuple[int, int, int]:
    """The model grid shape (x, y, z) voxels that keeps the default field of view (`MODEL_SHAPE` x
    `MODEL_SPACING_MM`, 480 x 480 x 192 mm) at the voxel size `spacing_mm` (x, y, z) mm, rounded to
    whole voxels (at least 1): 8 x 8 x 6 mm gives 60 x 60 x 32."""
    from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM

    return tuple(max(1, int(round(n * d / float(s)))) for n, d, s in zip(MODEL_SHAPE, MODEL_SPACING_MM, spacing_mm))


def dicom_grid(records: Iterable[Mapping | None]) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape (x, y, z) voxels, spacing (x, y, z) mm) of the model grid a DICOM-RT export is read onto for
    models trained on the spacings `records` (`spacing_record`; None: not known).

    `MODEL_SHAPE` x `MODEL_SPACING_MM` when that spacing `spacing_fits` every known record; else
    the smallest spacing of the first record that fits them all (of the first record when none
    does: `check_spacing` then names the model it does not fit), on `field_of_view_shape`, so the
    patient's field of view stays the default one. `predict_dicom` and plan QA's ``--dicom`` both
    read on it.
    """
    from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM

    known = [r for r in records if r is not None]
    if all(spacing_fits(MODEL_SPACING_MM, r) for r in known):
        return tuple(MODEL_SHAPE), tuple(float(v) for v in MODEL_SPACING_MM)
    candidates = [tuple(float(v) for v in r["min"]) for r in known]
    spacing = next((c for c in candidates if all(spacing_fits(c, r) for r in known)), candidates[0])
    return field_of_view_shape(spacing), spacing


def synthetic_scale(spacing_mm: Sequence[float]) -> float | None:
    """The ``--scale`` of `flaxdose.synth` (and ``data.scale`` of the built-in data) whose grid has the
    voxel size `spacing_mm` (x, y, z) mm: `MODEL_SPACING_MM` / spacing when that is one valid scale
    on every axis (`flaxdose.synthetic.anatomy.grid_for_scale`), else None."""
    from flaxdose.data.grid import MODEL_SPACING_MM
    from flaxdose.synthetic.anatomy import grid_for_scale

    scales = [d / float(s) for d, s in zip(MODEL_SPACING_MM, spacing_mm)]
    if max(scales) - min(scales) > 1e-6 * max(scales):
        return None
    scale = round(scales[0], 6)
    try:
        grid_for_scale(scale)
    except FlaxdoseError:
        return None
    return scale


def spacing_fixes(case: Case, record: Mapping) -> str:
    """How to give a model trained on the spacing range `record` a case like `case` on its spacing: the
    command that makes such data (synthetic data: its ``--scale``; DICOM: ``import_dicom --grid model`` with
    the spacing and the shape that keeps the field of view; OpenKBP: the training ``--downsample``)."""
    spacing = [float(v) for v in record["min"]]
    if case.meta.get("generator") == "flaxdose.synthetic":  # flaxdose.synthetic.generator.GENERATOR
        scale = synthetic_scale(spacing)
        if scale is None:
            return ("no synthetic grid scale gives that spacing (scales give 4x4x3 mm / scale); use a model trained "
                    "on synthetic data")
        style = case.style or "STYLE"
        return (f"synthetic data: python -m flaxdose.synth --style {style} --n N --out DIR --scale {scale:g} "
                f"(a run's built-in data: --config.data.scale={scale:g})")
    shape = field_of_view_shape(spacing)
    return (f"DICOM: python -m flaxdose.import_dicom SRC --out DATASET --like <the model's workdir>, which is "
            f"--grid model --model_spacing_mm {','.join(f'{v:g}' for v in spacing)} --model_shape "
            f"{','.join(str(n) for n in shape)} (this shape keeps the default 480x480x192 mm field of view), or predict "
            "and qa straight from the export with --dicom; OpenKBP: python -m flaxdose.convert_openkbp with the "
            "--downsample of the training data")


def check_spacing(case: Case, record: Mapping | None, model_name: str = "the model", what: str | None = None) -> None:
    """Raise FlaxdoseError when `case.spacing_mm` does not `spacing_fits` the training range `record`;
    nothing to check for `record` None. The error names the case as `what` (default: its id; a case
    read from a DICOM export: that folder) and the fixes (`spacing_fixes`)."""
    if record is None or spacing_fits(case.spacing_mm, record):
        return
    lo, hi = accepted_spacing(record)
    accepted = describe_spacing({"min": [round(float(v), 3) for v in lo], "max": [round(float(v), 3) for v in hi]})
    raise FlaxdoseError(
        f"{what or f'case {case.case_id!r}'} has voxel spacing {describe_spacing(case.spacing_mm)} mm "
        f"(x, y, z), but {model_name} was trained on {describe_spacing(record)} mm (it accepts {accepted}): its "
        f"dose would be wrong in scale. Give it data on the model's spacing: {spacing_fixes(case, record)}; or "
        "use a model trained at this spacing")


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


# ---------------------------------------------------------------- plausibility
# A prostate plan's maximum is ~105-115 % of the prescription; far above it the input is unlike
# anything the model was trained on. Prescriptions beyond these bounds look like cGy or a typo.
IMPLAUSIBLE_MAX_RELATIVE = 1.5
PLAUSIBLE_PRESCRIPTION_GY = (1.0, 120.0)


def implausible(case: Case, relative: np.ndarray) -> str:
    """Why a prediction (dose / prescription, (X, Y, Z)) should not be trusted, or "" (checks: its maximum
    against `IMPLAUSIBLE_MAX_RELATIVE`, the prescription against `PLAUSIBLE_PRESCRIPTION_GY`)."""
    lo, hi = PLAUSIBLE_PRESCRIPTION_GY
    if not lo <= case.prescription_gy <= hi:
        return (f"prescription {case.prescription_gy:g} Gy is outside {lo:g}-{hi:g} Gy (cGy given as Gy?); the "
                "predicted dose scales with it: check prescription_gy")
    peak = float(np.max(relative)) if relative.size else 0.0
    if peak > IMPLAUSIBLE_MAX_RELATIVE:
        return (f"predicted maximum {peak * case.prescription_gy:.1f} Gy is {peak:.2f} x the prescription: either "
                "the case is unlike the model's training data (structure names and order, grid, spacing?) or the "
                "model is under-trained (few steps; see its validation loss); do not use it")
    return ""


class Model:
    """A trained model: architecture, parameters, the structures it expects and its training patch size.

    `predict` runs sliding windows of the training patch size (50 % overlap, Gaussian
    blending): every window is exactly the input the model was trained on, including its
    GroupNorm statistics. `window=None` instead predicts each whole volume in one pass
    (zero-padded to the down-sampling factor and cropped back). `mirror=True` also predicts
    the left-right mirrored case (paired structures swapped, as the training flips do) and
    averages the two (test-time augmentation; twice the work). `with_distance`: the model also
    takes the target-distance channel (`flaxdose.data.pipeline.model_inputs`). `train_spacing_mm`:
    the training cases' spacing (`spacing_record`), checked against each case (`check_spacing`);
    None checks nothing (a model trained before runs stored it, or one built mid-training).
    """

    def __init__(self, spec: UNetSpec, params, structures: Sequence[str], name: str = "model",
                 window: Sequence[int] | None = None, overlap: float = 0.5, mirror: bool = False,
                 with_distance: bool = False, train_spacing_mm: Mapping | None = None):
        self.spec, self.structures, self.name = spec, tuple(structures), name
        self.with_distance = bool(with_distance)
        self.train_spacing_mm = None if train_spacing_mm is None else dict(train_spacing_mm)
        self.window, self.overlap, self.mirror = (tuple(window) if window else None), overlap, mirror
        self.params = jax.device_put(params)
        self._predict = make_predict_fn(spec)

    @classmethod
    def from_config(cls, config, params, name: str = "model", full_volume: bool = False, mirror: bool = False,
                    train_spacing_mm: Mapping | None = None) -> Model:
        """The model a run config trains (`config.model`, `config.data.structures` and `target_distance`, its
        patch size), with `params` (and the training spacing to check cases against, if known)."""
        window = None if full_volume else tuple(config.data.patch_shape)
        return cls(UNetSpec.from_config(config.model), params, config.data.structures, name=name, window=window,
                   mirror=mirror, with_distance=config.data.get("target_distance", False),
                   train_spacing_mm=train_spacing_mm)

    @classmethod
    def load(cls, path: str | Path, which: str = "best", full_volume: bool = False, mirror: bool = False) -> Model:
        """From a training workdir, a checkpoint path inside one (config.json is found above it), or a model
        package (`flaxdose.package`, hash-checked; it holds one set of weights, so `which` is ignored).

        `which`: "best" (lowest validation loss, else the latest) or "latest". The checkpoint's
        training spacing (`SPACING_KEY`) is checked against every case predicted; for a checkpoint
        without one (trained before runs stored it) it is recovered from the training data
        (`recovered_spacing`), and only when that cannot be read is a warning logged that it cannot
        be checked. Raises
        FlaxdoseError when there is no checkpoint or config.json, or the shapes differ.
        """
        from flaxdose import package

        path = Path(path)
        if package.is_package(path):
            return package.load_model(path, full_volume=full_volume, mirror=mirror)
        config_file = run_config_file(path, which)
        config = config_lib.load_config_json(config_file)
        spec = UNetSpec.from_config(config.model)
        template = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
        params, meta = restore_params(path, template, which)
        name = config_file.parent.name
        spacing = meta.get(SPACING_KEY)
        if spacing is None:
            try:
                spacing = recovered_spacing(path)
                log.info("model %s: training voxel spacing %s mm recovered from its training data (its checkpoint "
                         "predates stored spacings)", name, describe_spacing(spacing))
            except FlaxdoseError as e:
                log.warning("model %s (%s) stores no training voxel spacing and its training data cannot be read "
                            "(%s): the spacing of the cases it predicts cannot be checked, and on another spacing "
                            "its dose is wrong in scale. Predict only data on the training spacing, or retrain it "
                            "with this flaxdose (runs now store the spacing)", name, config_file.parent, e)
        trained, planned = max(saved_steps(config_file.parent / CHECKPOINTS), default=None), int(config.train.steps)
        if trained is not None and trained < planned:
            log.warning("model %s: its training stopped at step %d of %d (an unfinished run); rerun the training "
                        "command to finish it", name, trained, planned)
        return cls.from_config(config, params, name=name, full_volume=full_volume, mirror=mirror,
                               train_spacing_mm=spacing)

    def predict_relative(self, inputs: np.ndarray, batch_size: int = 1) -> np.ndarray:
        """(X, Y, Z, C) `model_inputs` -> (X, Y, Z) dose in units of the prescription."""
        run = lambda x: self._predict(self.params, x)
        one = lambda v: (np.asarray(run(v[None]))[0] if self.window is None
                         else sliding_window(run, v, self.window, self.overlap, batch_size))
        if not self.mirror:
            return one(inputs)
        swapped = inputs[::-1][..., list(lr_swap_permutation(self.structures, self.with_distance))]  # x: right -> left
        return (one(inputs) + one(np.ascontiguousarray(swapped))[::-1]) / 2

    def check_case(self, case: Case, what: str | None = None) -> None:
        """Raise FlaxdoseError unless the model can predict `case`: the model's structures in its order, a
        prescription, and a voxel spacing within the training spacing's tolerance (`check_spacing`; the
        error names the case as `what`, default its id)."""
        case.check_structures(self.structures)
        if not case.prescription_gy > 0:
            raise FlaxdoseError(f"{what or f'case {case.case_id!r}'} has no prescription; set prescription_gy to "
                                "predict Gy")
        check_spacing(case, self.train_spacing_mm, f"model {self.name!r}", what)

    def predict(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False,
                check: bool = True) -> list[Case]:
        """Predicted dose for each case, as copies of the cases with `dose` replaced.

        The dose is float32 (X, Y, Z) in Gy: the network's output x the case's prescription,
        clipped at 0 and zero outside `Case.dose_region`. With `check`, an `implausible` prediction is
        logged and noted in the case's meta (``prediction_warning``). Raises FlaxdoseError for a case
        `check_case` refuses (before predicting any), and for one without target voxels when the model
        takes the target distance.
        """
        for case in cases:
            self.check_case(case)
        out = []
        for case in tqdm(cases, desc=f"predict {self.name}", unit="case", disable=not progress):
            relative = self.predict_relative(model_inputs(case, self.with_distance), batch_size)
            if not np.isfinite(relative).all():  # the inputs are masks: the model is at fault, not the case
                raise FlaxdoseError(f"model {self.name!r} predicted NaN or infinite dose for case {case.case_id!r}: "
                                    "its weights are broken (a diverged training run?); predict with another "
                                    "checkpoint (--which latest) or retrain")
            dose = np.clip(relative, 0.0, None) * case.prescription_gy
            region = case.dose_region()
            if region is not None:  # no dose in the air around the patient
                dose = dose * region
            dose = dose.astype(np.float32)
            meta = {**case.meta, "predicted_by": self.name}
            doubt = implausible(case, dose / case.prescription_gy) if check else ""
            if doubt:
                log.warning("case %s: %s", case.case_id, doubt)
                meta["prediction_warning"] = doubt
            out.append(case.replace(dose=dose, meta=meta))
        return out


def validation_mse(model: Model, cases: Sequence[Case], batch_size: int = 1) -> float:
    """Mean over `cases` of the voxel mean of ((predicted - reference dose) / prescription)^2.

    The prediction is exactly what `Model.predict` returns (and evaluation scores): sliding
    windows, clipped at 0, zero outside the dose region. The training loop selects its
    `best` checkpoint with this. NaN for no cases; raises FlaxdoseError for cases without a
    dose (and see `Model.predict`).
    """
    if not cases:
        return float("nan")
    missing = [c.case_id for c in cases if c.dose is None]
    if missing:
        raise FlaxdoseError(f"validation cases {missing[:5]} have no reference dose")
    predicted = model.predict(cases, batch_size=batch_size, check=False)  # mid-training models are far off
    return float(np.mean([np.mean(((p.dose - c.dose) / c.prescription_gy) ** 2, dtype=np.float64)
                          for p, c in zip(predicted, cases)]))


def predict_dataset(model: Model, data: str | Path, split: str, out: str | Path, batch_size: int = 1,
                    overwrite: bool = False, keep_going: bool = False) -> Dataset:
    """Predict every case of a split of the dataset `data` and write them as a dataset at `out`.

    `split` "all" (`data.case.ALL_SPLITS`, unless the dataset has a split of that name): every case of every
    split, each once, in split order, written as the split "all".

    The written cases are copies of the inputs whose `dose` is the prediction (Gy), with the
    split's name and ids. `keep_going`: a case that cannot be read or predicted (a FlaxdoseError:
    no target, other structures or spacing, ...) is logged and left out, and the manifest's
    ``failed`` maps its id to the reason (always present, {} when none failed); otherwise the
    first such case stops the run. Raises FlaxdoseError for an empty split, an `out` that holds
    files (unless `overwrite`), or when no case could be predicted (naming why); nothing
    half-written is left.
    """
    check_writable(out, overwrite)
    dataset = with_all_split(Dataset.open(data), split)
    ids = dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; nothing to predict")
    if not keep_going:
        predictions, done, failed = model.predict([dataset.load(i) for i in ids], batch_size=batch_size,
                                                  progress=True), ids, {}
    else:
        results, failed = each_case(ids, lambda i: model.predict([dataset.load(i)], batch_size=batch_size)[0],
                                    action="predicted", what=f"split {split!r} of {dataset.root}")
        predictions, done = list(results.values()), list(results)
    return write_dataset(out, predictions, {split: done}, overwrite=overwrite,
                         extra={"predicted_by": str(model.name), "source_dataset": str(Path(data).resolve()),
                                "failed": failed})


def read_dicom_case(models: Sequence[Model], patient_dir: str | Path, prescription_gy: float | None = None, *,
                    read_dose: bool = False, model_shape: Sequence[int] | None = None,
                    model_spacing_mm: Sequence[float] | None = None, aliases=None, plan=None) -> Case:
    """A patient's DICOM-RT export read onto the model grid for `models`, checked for each of them.

    The grid is `dicom_grid` of the models' training spacings unless given: `model_spacing_mm`
    alone gets the `field_of_view_shape`, `model_shape` alone the chosen spacing. `read_dose`:
    also read the export's RTDOSE (else it is ignored). `aliases`: a `flaxdose.dicom.AliasTable`
    (ROI names for the model's structures; default the built-in names). `plan`: the plan's files
    (`flaxdose.dicom.PlanFiles`, e.g. of `find_dicom_plans`) when `patient_dir` holds several; the
    folder then only names it. Raises FlaxdoseError when the export cannot be read, has no
    prescription (give one), or a model cannot predict it (structures, spacing; naming the folder,
    not the case's anonymous id).
    """
    from flaxdose.dicom import read_plan, read_rt

    if plan is None and not Path(patient_dir).is_dir():  # before any log line says it is being read
        problem = "is not a folder" if Path(patient_dir).exists() else "does not exist"
        raise FlaxdoseError(f"the DICOM export {patient_dir} {problem}; give the folder of one patient's "
                            "CT, RTSTRUCT and RTPLAN files")
    models = list(models)
    shape, spacing = dicom_grid(m.train_spacing_mm for m in models)
    if model_spacing_mm is not None:
        given = tuple(float(v) for v in model_spacing_mm)
        for m in models:  # before reading: the fix is the flag, not a re-import
            if m.train_spacing_mm is not None and not spacing_fits(given, m.train_spacing_mm):
                raise FlaxdoseError(
                    f"the DICOM export {patient_dir}: model_spacing_mm {describe_spacing(given)} mm does "
                    f"not fit {m.name}, trained on "
                    f"{describe_spacing(m.train_spacing_mm)} mm: leave --model_spacing_mm out (the export is then "
                    f"read on {describe_spacing(spacing)} mm) or give a spacing the model was trained on")
        spacing, shape = given, field_of_view_shape(given)
    shape = tuple(int(v) for v in model_shape) if model_shape is not None else shape
    log.info("reading %s on the model grid: %s voxels of %s mm (x, y, z)", patient_dir,
             "x".join(map(str, shape)), describe_spacing(spacing))
    kwargs = dict(grid="model", prescription_gy=prescription_gy, read_dose=read_dose, model_shape=shape,
                  model_spacing_mm=spacing, aliases=aliases)
    if plan is not None:
        case = read_plan(plan, models[0].structures, **kwargs)
    else:
        case = read_rt(patient_dir, structures=models[0].structures, **kwargs)
    if not case.prescription_gy > 0:
        raise FlaxdoseError(f"no RTPLAN prescription found in {patient_dir}; pass --prescription_gy")
    for model in models:
        model.check_case(case, what=f"the DICOM export {patient_dir}")
    return case


def predict_dicom(model: Model, patient_dir: str | Path, prescription_gy: float | None = None, *, aliases=None,
                  plan=None, batch_size: int = 1) -> Case:
    """Read a patient's DICOM-RT export onto the model grid and predict its dose (a Case, dose in Gy).

    The grid is `dicom_grid`'s (`read_dicom_case`): `flaxdose.data.grid.MODEL_SHAPE` voxels of
    `MODEL_SPACING_MM`, or the model's training spacing (its smallest) with the same field of
    view when that default does not fit it. The export's RTDOSE, if any, is ignored. `aliases`,
    `plan`: see `read_dicom_case`; `batch_size`: windows per forward pass. Raises FlaxdoseError when the export cannot be read, has no
    prescription (give one), or the model cannot predict it.
    """
    case = read_dicom_case([model], patient_dir, prescription_gy, aliases=aliases, plan=plan)
    return model.predict([case], batch_size=batch_size)[0]


# ---------------------------------------------------------------- DICOM-RT exports: plans in, RTDOSE out
RTDOSE_NAME = "RD_flaxdose.dcm"  # the file an --rtdose_out folder (and each plan folder of --out) gets
PLAN_METRICS_CSV = "metrics.csv"
PLAN_FIGURE = "dose.png"
SUMMARY_CSV = "summary.csv"
METRIC_COLUMNS = ("plan", "structure", "metric", "value", "unit", "grid")


@dataclasses.dataclass
class DicomPlan:
    """One plan found under a DICOM-RT export root (`find_dicom_plans`).

    `name`: its output name (``plan_01``, ...: never the patient's name or ID); `folder`: where
    its files lie (console messages only, never written); `files`: its `flaxdose.dicom.PlanFiles`,
    None when none could be formed; `problem`: why it cannot be read ("" when it can).
    """

    name: str
    folder: str
    files: object | None
    problem: str = ""
    stray_doses: list = dataclasses.field(default_factory=list)  # the patient's RTDOSE files no plan uses


def _common_folder(paths: Iterable[Path]) -> str:
    import os

    folders = [str(Path(p).parent) for p in paths]
    return os.path.commonpath(folders) if folders else "?"


def find_dicom_plans(root: str | Path, skipped: list | None = None) -> list[DicomPlan]:
    """Every plan of every patient under `root` (files and folders searched recursively), in folder order.

    A plan is a CT series + RTSTRUCT (+ RTPLAN, + RTDOSE), grouped by `flaxdose.dicom.group_plans`
    (references between the files, never file names). Entries with a `problem` stand for what could
    not become a readable plan: damaged files (stopping the plan beside them), a patient whose files
    form no plan (e.g. no RTSTRUCT). `skipped`, when given, gets (path, why) of the files set aside that
    stop no plan (other SOP classes, flaxdose's own predictions, RTPLANs no dose belongs to). Raises
    FlaxdoseError when `root` does not exist or holds no DICOM.
    """
    from flaxdose.dicom import group_plans
    from flaxdose.dicom.archives import archive_kind
    from flaxdose.dicom.damage import damaged_among, plan_damage
    from flaxdose.dicom.files import scan_tree

    if not Path(root).exists():
        raise FlaxdoseError(f"the DICOM export root {root} does not exist; give the folder holding the patients' "
                            "CT, RTSTRUCT and RTPLAN files")
    scanned = scan_tree(root)
    files, damaged = scanned.files, scanned.damaged
    # Archives are not unpacked here (their files would have to outlive the scan): each one may hold a
    # patient, so it is a failed entry (exit 1) naming the fix, never skipped unseen.
    archives = [DicomPlan("", str(path), None, f"{path} is an archive ({kind}), which predict --dicom does not "
                          "unpack: unpack it into the export root and run again (import_dicom reads archives)")
                for path, _ in scanned.not_read if (kind := archive_kind(Path(path)))]
    if not files and not damaged and not archives:
        raise FlaxdoseError(f"no DICOM files found under {root}; give the folder of the DICOM-RT exports")
    grouping = group_plans(files)
    if skipped is not None:
        skipped += [(str(path), why) for path, why in [*grouping.ignored, *getattr(grouping, "unused", [])]]
    found = []
    claimed = set()
    for plan in grouping.plans:
        folder = _common_folder(f.path for f in plan.files)
        problem = "; ".join([*plan.problems, plan_damage(damaged, plan.files) or ""]).strip("; ")
        claimed |= {p for p, _ in damaged_among(damaged, plan.files)}
        found.append(DicomPlan("", folder, plan, problem))
    for pid, value in grouping.patients.items():
        if isinstance(value, str):  # a patient whose files form no plan
            mine = [f for f in files if f.patient_id == pid]
            claimed |= {p for p, _ in damaged_among(damaged, mine)}
            damage = plan_damage(damaged, mine) or ""
            found.append(DicomPlan("", _common_folder(f.path for f in mine), None,
                                   "; ".join(v for v in (value, damage) if v)))
    rest = [(p, why) for p, why in damaged if p not in claimed]
    for folder in sorted({str(Path(p).parent) for p, _ in rest}):
        found.append(DicomPlan("", folder, None, plan_damage([d for d in rest if str(Path(d[0]).parent) == folder],
                                                             where="here") or "damaged files"))
    found += archives
    used = {d.sop_uid for p in grouping.plans for d in p.doses}
    for entry in found:
        if entry.files is not None:
            entry.stray_doses = [f for f in files if f.kind == "RTDOSE" and f.patient_id == entry.files.patient_id
                                 and f.sop_uid not in used and not getattr(f, "predicted", False)]
    found.sort(key=lambda p: (p.folder, p.files.plan.path.name if p.files is not None and p.files.plan else ""))
    width = max(2, len(str(len(found))))
    for i, p in enumerate(found):
        p.name = f"plan_{i + 1:0{width}d}"
    return found


def one_dicom_plan(patient_dir: str | Path) -> DicomPlan:
    """The one readable plan of a patient's export folder (`find_dicom_plans`). Raises FlaxdoseError when the
    folder does not exist, holds no plan or several (naming them), or its plan cannot be read (why)."""
    if not Path(patient_dir).is_dir():
        problem = "is not a folder" if Path(patient_dir).exists() else "does not exist"
        raise FlaxdoseError(f"the DICOM export {patient_dir} {problem}; give the folder of one patient's "
                            "CT, RTSTRUCT and RTPLAN files")
    plans = find_dicom_plans(patient_dir)
    if len(plans) != 1:
        names = "; ".join(f"{p.folder}" + (f" ({p.problem})" if p.problem else "") for p in plans)
        raise FlaxdoseError(f"{patient_dir} holds {len(plans)} plans ({names}); give one patient's folder (one "
                            "plan), or predict them all with python -m flaxdose.predict --dicom ROOT --out OUT")
    if plans[0].problem:
        raise FlaxdoseError(f"the DICOM export {plans[0].folder}: {plans[0].problem}")
    return plans[0]


def missing_dose_reason(entry: DicomPlan) -> str:
    """Why `entry`'s plan has no RTDOSE, in words: no RTDOSE in the export at all, or RTDOSE files there that
    belong to another frame of reference (or plan) than the CT and structures."""
    if not entry.stray_doses:
        return (f"{entry.folder} holds no RTDOSE for the plan; export the plan's calculated dose (RTDOSE, "
                "DoseSummationType PLAN) with the CT, structures and RTPLAN")
    other = [d for d in entry.stray_doses if d.for_uid != entry.files.for_uid]
    names = ", ".join(d.path.name for d in entry.stray_doses[:3])
    if other:
        return (f"the RTDOSE in {entry.folder} ({names}) is on frame of reference {other[0].for_uid}, the CT and "
                f"structure set on {entry.files.for_uid}: it is the dose of another plan or another CT, not this "
                "plan's; export the dose calculated on this CT (or the CT and structures its plan was made on)")
    return (f"the RTDOSE in {entry.folder} ({names}) belongs to another RTPLAN than the structure set's; export this "
            "plan's dose")


def resolve_rtdose_path(out: str | Path) -> Path:
    """Where `--rtdose_out OUT` writes: OUT itself when it ends in ``.dcm`` (its folder is created),
    else OUT/`RTDOSE_NAME` (OUT created): one fixed name, so a rerun replaces the file instead of
    adding another. Raises FlaxdoseError when a ``.dcm`` OUT is an existing folder, and when a folder on
    the way to it is an existing file (``notes.txt/out.dcm``)."""
    out = Path(out)
    for above in out.parents:  # the nearest existing folder on the way must be a folder, not a file
        if above.exists() or above.is_symlink():
            if not above.is_dir():
                raise FlaxdoseError(f"--rtdose_out {out}: {above} is a file, not a folder, so nothing can be written "
                                    f"under it; give a .dcm file or a folder elsewhere, e.g. "
                                    f"{above.parent / 'rtdose' / RTDOSE_NAME}")
            break
    if out.suffix.lower() == ".dcm":
        if out.is_dir():
            raise FlaxdoseError(f"--rtdose_out {out} is a folder; give a file name ending in .dcm or a folder")
        return out
    if out.exists() and not out.is_dir():
        raise FlaxdoseError(f"--rtdose_out {out} is a file that does not end in .dcm; give a .dcm file or a folder")
    return out / RTDOSE_NAME


def export_rtdose(predicted: Case, reference_ct, out: str | Path, plan: str | Path | None = None, *,
                  bits: int = 32, ct_series_uid: str | None = None, overwrite: bool = True) -> Path:
    """Write one RTDOSE of `predicted` on the CT it was read from (`flaxdose.dicom.write_rtdose`); its path.

    `reference_ct`: the CT folder or the CT files (a `PlanFiles`' ``ct``); `ct_series_uid`: the
    series among several (the one the structure set references); `out`: a ``.dcm`` file or a folder
    (`resolve_rtdose_path`); `plan`: the RTPLAN file, referenced by the dose (Type 1C for a PLAN
    dose); `bits`: 16 or 32 per stored value. Raises FlaxdoseError when the file exists and not
    `overwrite`, and for what `write_rtdose` refuses.
    """
    from flaxdose.dicom import write_rtdose

    path = resolve_rtdose_path(out)
    if path.exists() and not overwrite:
        raise FlaxdoseError(f"{path} exists; pass --overwrite to replace it, or choose another --rtdose_out")
    path.parent.mkdir(parents=True, exist_ok=True)
    if plan is None:
        log.warning("the RTDOSE references no RTPLAN (none given): a PLAN dose must reference its plan (Type 1C), "
                    "validators and some planning systems refuse it; export the RTPLAN with the CT and structures")
    return write_rtdose(predicted, reference_ct, path, plan_path=plan, bits=bits, ct_series_uid=ct_series_uid)


def export_plan_rtdose(predicted: Case, plan, out: str | Path, *, bits: int = 32, overwrite: bool = True) -> Path:
    """`export_rtdose` onto the CT series and frame of reference `plan` (a `PlanFiles`) was read from,
    referencing its RTPLAN when the export holds one. Raises FlaxdoseError when the plan has no CT."""
    if not plan.ct:
        raise FlaxdoseError(f"the export in {plan.label} holds no CT series: an RTDOSE is written on the planning "
                            "CT; export the CT with the structures")
    return export_rtdose(predicted, [f.path for f in plan.ct], out, plan.plan.path if plan.plan else None, bits=bits,
                         ct_series_uid=plan.ct[0].series_uid, overwrite=overwrite)


def rtdose_case(plan, rtdose_path: str | Path, structures: Sequence[str], prescription_gy: float, aliases=None) -> Case:
    """The dose of the RTDOSE file at `rtdose_path` (one written for `plan`) on its own grid, with `plan`'s
    structures rasterized on that grid (as a planning system computes a DVH), as a Case with the
    prescription `prescription_gy`. Raises FlaxdoseError when the file or structures cannot be read."""
    from flaxdose.dicom import read_plan
    from flaxdose.dicom.files import RTDOSE_STORAGE, DicomFile

    rd = DicomFile(Path(rtdose_path), "RTDOSE", RTDOSE_STORAGE, "", "", "", "", plan.for_uid, dose_summation="PLAN")
    on_file = dataclasses.replace(plan, doses=[rd], dose_kind="PLAN", problems=[], notes=[])
    # prescription 0: no plausibility window for a prediction (an under-trained model is reported, not refused)
    case = read_plan(on_file, structures, grid="dose", prescription_gy=0.0, min_coverage=0.0, aliases=aliases)
    return case.replace(prescription_gy=float(prescription_gy))


def grid_name(case: Case) -> str:
    """How reports name the grid a case's metrics were computed on: ``RTDOSE grid 2x2.5x2.5 mm, 64x48x32``."""
    what = {"dose": "RTDOSE grid", "model": "model grid", "ct": "CT grid"}.get(case.meta.get("grid"), "case grid")
    return f"{what} {describe_spacing(case.spacing_mm)} mm, {'x'.join(map(str, case.shape))} voxels"


def case_metric_rows(case: Case, specs: Sequence[str], name: str) -> list[dict]:
    """Rows (`METRIC_COLUMNS`) of the paper's DVH metrics (Gy) and the metric `specs` of `case`'s dose."""
    from flaxdose.metrics import plan_dvh_metrics, spec_metrics, spec_unit

    grid = grid_name(case)
    rows = []
    paper = plan_dvh_metrics(case.dose, case.masks, case.structures, case.spacing_mm, targets=case.targets)
    for key, value in paper.items():
        structure, metric = key.rsplit(" ", 1)
        rows.append({"plan": name, "structure": structure, "metric": metric, "value": value, "unit": "Gy", "grid": grid})
    done = {(r["structure"], r["metric"]) for r in rows}
    for text, value in spec_metrics(case.dose, case.masks, case.structures, case.spacing_mm, case.prescription_gy,
                                    specs).items():
        structure, metric = text.rsplit(" ", 1)
        if (structure, metric) not in done:
            rows.append({"plan": name, "structure": structure, "metric": metric, "value": value,
                         "unit": spec_unit(text), "grid": grid})
    return rows


def write_metric_csv(rows: Sequence[Mapping], path: str | Path) -> Path:
    """Write metric rows (`METRIC_COLUMNS`; values with 4 decimals, empty for NaN) as CSV at `path`."""
    import csv
    import io as _io
    import math

    from flaxdose.io import atomic_write_text

    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        value = row["value"]
        writer.writerow({**row, "value": "" if not math.isfinite(value) else f"{value:.4f}"})
    return atomic_write_text(path, buffer.getvalue())


KEY_METRICS = ("PTV D95", "PTV D2", "Rectum Dmean", "Bladder Dmean")  # shown on the console per plan


@dataclasses.dataclass
class PlanResult:
    """What `predict_dicom_folder` did with one plan: `rtdose` / `metrics_csv` / `figure` paths (None
    when not written), `metrics` {"<structure> <metric>": value} on `grid`, `error` ("" when done),
    `saved` (the prediction as a Case .npz when the RTDOSE could not be written), `warning` (why the
    prediction is implausible, `implausible`; "" when it is not)."""

    name: str
    folder: str
    rtdose: Path | None = None
    metrics_csv: Path | None = None
    figure: Path | None = None
    metrics: dict = dataclasses.field(default_factory=dict)
    grid: str = ""
    prescription_gy: float = float("nan")
    error: str = ""
    saved: Path | None = None
    warning: str = ""


def predict_dicom_folder(model: Model, root: str | Path, out: str | Path, *, prescription_gy: float | None = None,
                         aliases=None, bits: int = 32, specs: Sequence[str] | None = None, overwrite: bool = False,
                         figures: bool = True, batch_size: int = 1,
                         echo: Callable[[str], None] | None = None) -> list[PlanResult]:
    """Predict every plan under the DICOM-RT export root `root` and write the results to the folder `out`.

    Per plan, `out`/<name>/ (name ``plan_01``, ... in folder order, `find_dicom_plans`) gets
    `RTDOSE_NAME` (the prediction on the plan's CT series and frame of reference, referencing its
    RTPLAN), `PLAN_METRICS_CSV` (`METRIC_COLUMNS`: the paper's DVH metrics and `specs`, default
    `flaxdose.metrics.PROSTATE_METRIC_SPECS`, computed on that RTDOSE's own grid with the structures
    rasterized on it, as a planning system would) and `PLAN_FIGURE` (`flaxdose.plots.plan_dose_figure`);
    `out`/`SUMMARY_CSV` holds one row per plan (folder-free: name, status, Rx, grid, key metrics).
    A plan that cannot be read or predicted is reported (`PlanResult.error`) and the others go on;
    when only its RTDOSE cannot be written, the prediction is kept as <name>/prediction.npz. `echo`
    gets one console line per plan (its folder and key metrics). The folder is written atomically.
    Raises FlaxdoseError when `out` holds files (and not `overwrite`), lies inside `root`, or `root`
    holds no DICOM.
    """
    from flaxdose import plots
    from flaxdose.io import atomic_folder
    from flaxdose.metrics import PROSTATE_METRIC_SPECS, parse_metric_spec

    specs = tuple(PROSTATE_METRIC_SPECS if specs is None else specs)
    for spec in specs:
        parse_metric_spec(spec)  # a typo refused before any work
    where, target = Path(root).expanduser().resolve(), Path(out).expanduser().resolve()
    if target == where or where in target.parents:
        raise FlaxdoseError(f"--out {out} lies inside the export root {root}: the results would be mixed with the "
                            "patients' files; choose an output folder outside it")
    if target in where.parents:
        raise FlaxdoseError(f"--out {out} holds the export root {root}: writing it would replace the exports; choose "
                            "an output folder outside it")
    check_writable(out, overwrite)
    skipped = []
    plans = find_dicom_plans(root, skipped)
    echo = echo or (lambda line: None)
    echo(f"{len(plans)} plan(s) under {root}; writing {out}")
    for path, why in skipped:
        echo(f"not read: {path}: {why}")
    results = []
    with atomic_folder(out, overwrite) as tmp:
        for entry in plans:
            result = PlanResult(entry.name, entry.folder)
            results.append(result)
            if entry.problem:
                result.error = entry.problem
            else:
                _predict_one_plan(model, entry, tmp / entry.name, result, prescription_gy, aliases, bits, specs,
                                  figures, plots, batch_size)
            echo(plan_line(result))
        write_summary(results, tmp / SUMMARY_CSV)
    out = Path(out)
    for r in results:  # the paths where they are now
        for field in ("rtdose", "metrics_csv", "figure", "saved"):
            value = getattr(r, field)
            if value is not None:
                setattr(r, field, out / r.name / Path(value).name)
    return results


def _predict_one_plan(model, entry: DicomPlan, folder: Path, result: PlanResult, prescription_gy, aliases, bits,
                      specs, figures, plots, batch_size) -> None:
    try:
        predicted = predict_dicom(model, entry.folder, prescription_gy, aliases=aliases, plan=entry.files,
                                  batch_size=batch_size)
    except FlaxdoseError as e:
        result.error = str(e)
        return
    folder.mkdir(parents=True, exist_ok=True)
    result.prescription_gy = predicted.prescription_gy
    result.warning = predicted.meta.get("prediction_warning", "")
    try:
        result.rtdose = export_plan_rtdose(predicted, entry.files, folder / RTDOSE_NAME, bits=bits)
        on_grid = rtdose_case(entry.files, result.rtdose, predicted.structures, predicted.prescription_gy, aliases)
    except FlaxdoseError as e:  # the prediction is not lost: kept on the model grid
        result.saved = predicted.save(folder / "prediction.npz")
        result.error = f"{e} (the prediction is kept in {entry.name}/prediction.npz)"
        on_grid = predicted
    rows = case_metric_rows(on_grid, specs, entry.name)
    result.grid = grid_name(on_grid)
    result.metrics = {f"{r['structure']} {r['metric']}": r["value"] for r in rows}
    result.metrics_csv = write_metric_csv(rows, folder / PLAN_METRICS_CSV)
    if figures:
        result.figure = plots.plan_dose_figure(on_grid, folder / PLAN_FIGURE, title=f"{entry.name}: predicted dose "
                                               f"({result.grid})")


def predict_dicom_patient(model: Model, patient_dir: str | Path, rtdose_out: str | Path, *,
                          prescription_gy: float | None = None, aliases=None, bits: int = 32,
                          specs: Sequence[str] | None = None, overwrite: bool = False, reference=None,
                          plan_path: str | Path | None = None, batch_size: int = 1) -> PlanResult:
    """Predict the one plan of a patient's export folder and write its RTDOSE at `rtdose_out` (a ``.dcm`` file,
    or a folder that gets `RTDOSE_NAME`: `resolve_rtdose_path`).

    The RTDOSE goes onto the CT series and frame of reference the case was read from (the series its
    structure set references) and references the export's RTPLAN, unless `reference` (a CT folder) or
    `plan_path` (an RTPLAN file) say otherwise. The result's metrics (the paper's and `specs`) are
    computed on the written RTDOSE's own grid. When the RTDOSE cannot be written, the prediction is
    saved as prediction.npz beside `rtdose_out` and the error says so. Raises FlaxdoseError for a
    folder without exactly one readable plan, an existing file without `overwrite` (before predicting),
    and for what reading, predicting or writing refuses.
    """
    from flaxdose.metrics import PROSTATE_METRIC_SPECS

    target = resolve_rtdose_path(rtdose_out)
    if target.exists() and not overwrite:
        raise FlaxdoseError(f"{target} exists; pass --overwrite to replace it, or choose another --rtdose_out")
    entry = one_dicom_plan(patient_dir)
    predicted = predict_dicom(model, entry.folder, prescription_gy, aliases=aliases, plan=entry.files,
                              batch_size=batch_size)
    try:
        if reference is not None or plan_path is not None:
            path = export_rtdose(predicted, reference or [f.path for f in entry.files.ct], target,
                                 plan_path or (entry.files.plan.path if entry.files.plan else None), bits=bits,
                                 ct_series_uid=None if reference or not entry.files.ct else entry.files.ct[0].series_uid,
                                 overwrite=overwrite)
        else:
            path = export_plan_rtdose(predicted, entry.files, target, bits=bits, overwrite=overwrite)
    except FlaxdoseError as e:
        target.parent.mkdir(parents=True, exist_ok=True)
        kept = predicted.save(target.parent / "prediction.npz")
        raise FlaxdoseError(f"{e} (the prediction is kept as {kept}: a flaxdose Case, dose in Gy)") from None
    on_grid = rtdose_case(entry.files, path, predicted.structures, predicted.prescription_gy, aliases)
    rows = case_metric_rows(on_grid, tuple(PROSTATE_METRIC_SPECS if specs is None else specs), "")
    return PlanResult("plan", entry.folder, rtdose=path, grid=grid_name(on_grid),
                      prescription_gy=predicted.prescription_gy, warning=predicted.meta.get("prediction_warning", ""),
                      metrics={f"{r['structure']} {r['metric']}": r["value"] for r in rows})


def plan_line(result: PlanResult) -> str:
    """One console line for a plan: its folder and key metrics, or why it failed."""
    import math

    if result.error and not result.metrics:
        return f"{result.name} ({result.folder}): FAILED: {result.error}"
    shown = ", ".join(f"{k} {result.metrics[k]:.2f} Gy" for k in KEY_METRICS
                      if k in result.metrics and math.isfinite(result.metrics[k]))
    tail = (f"; NOT EXPORTED: {result.error}" if result.error else "") + (
        f"; IMPLAUSIBLE: {result.warning}" if result.warning else "")
    return f"{result.name} ({result.folder}): Rx {result.prescription_gy:g} Gy, {shown} [{result.grid}]{tail}"


def write_summary(results: Sequence[PlanResult], path: str | Path) -> Path:
    """One CSV row per plan: name, status ("ok", "not exported", "failed"), error, warning (an implausible
    prediction's reason), Rx, grid, files and
    every metric of the plans (one column each, in first-seen order). No folder names (they may name
    the patient)."""
    import csv
    import io as _io
    import math

    from flaxdose.io import atomic_write_text

    keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    columns = ["plan", "status", "prescription_gy", "grid", "rtdose", "error", "warning", *keys]
    buffer = _io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in results:
        status = "ok" if not r.error else "not exported" if r.metrics else "failed"
        error = r.error.replace(r.folder, f"<{r.name} folder>") if r.folder not in ("", "?") else r.error
        row = {"plan": r.name, "status": status, "grid": r.grid, "error": error.replace("\n", " "), "warning": r.warning,
               "prescription_gy": "" if math.isnan(r.prescription_gy) else f"{r.prescription_gy:g}",
               "rtdose": f"{r.name}/{Path(r.rtdose).name}" if r.rtdose else ""}
        row.update({k: "" if not math.isfinite(v) else f"{v:.4f}" for k, v in r.metrics.items()})
        writer.writerow(row)
    return atomic_write_text(path, buffer.getvalue())
