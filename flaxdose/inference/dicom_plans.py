"""Predicting clinical DICOM plans: reading a patient's CT/RTSTRUCT onto the model grid, finding the
plans of an export, writing RTDOSE files, per-plan DVH metrics and a summary table.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from flaxdose.data.case import Case
from flaxdose.dicom import ReadOptions, group_plans, read_plan, read_rt, write_rtdose
from flaxdose.dicom.archives import archive_kind
from flaxdose.dicom.damage import damaged_among, plan_damage
from flaxdose.dicom.files import RTDOSE_STORAGE, DicomFile, scan_tree
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.predictor import Model
from flaxdose.inference.spacing import (
    describe_spacing,
    dicom_grid,
    field_of_view_shape,
    spacing_fits,
)
from flaxdose.io import atomic_folder, atomic_write_text, check_writable
from flaxdose.metrics import PROSTATE_METRIC_SPECS, parse_metric_spec, plan_dvh_metrics, spec_metrics, spec_unit

log = logging.getLogger("flaxdose")


def read_dicom_case(models: Sequence[Model], patient_dir: str | Path, prescription_gy: float | None = None, *,
                    read_dose: bool = False, model_shape: Sequence[int] | None = None,
                    model_spacing_mm: Sequence[float] | None = None, aliases=None, plan=None) -> Case:
    """A patient's DICOM-RT export read onto the model grid for `models`, checked for each of them.

    The grid is `dicom_grid` of the models' training spacings unless given: `model_spacing_mm`
    alone gets the `field_of_view_shape`, `model_shape` alone the chosen spacing. `read_dose`:
    also read the export's RTDOSE (else it is ignored). `aliases`: a `flaxdose.dicom.AliasTable`
    (ROI names for the model's structures; default the built-in names). `plan`: the plan's files
    (`flaxdose.dicom.PlanFiles`, e.g. of `find_dicom_plans`) when `patient_dir` holds several; the
    folder then only names it. A model that takes the CT (``data.include_ct``) gets the plan's CT, resampled
    onto the model grid. Raises FlaxdoseError when the export cannot be read, has no prescription (give
    one), has no CT series a model needs, or a model cannot predict it (structures, spacing; naming the
    folder, not the case's anonymous id).
    """
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
    ct_models = [m.name for m in models if m.inputs.include_ct]  # the CT channel: the plan's CT on the model grid
    include_ct = bool(ct_models)
    if include_ct:  # before reading: the reader's own message would suggest importing without the CT
        plan = one_dicom_plan(patient_dir).files if plan is None else plan
        if not plan.ct:
            why = f" ({plan.ct_missing})" if plan.ct_missing else ""
            raise FlaxdoseError(f"the DICOM export {patient_dir} has no CT series for its plan{why}, but model "
                                f"{ct_models[0]!r} takes the CT as an input (data.include_ct): export the planning CT "
                                "with the plan, or predict with a model trained without the CT")
    options = ReadOptions(models[0].structures, "model", aliases=aliases, prescription_gy=prescription_gy,
                          model_shape=shape, model_spacing_mm=spacing, read_dose=read_dose, include_ct=include_ct)
    case = read_plan(plan, options) if plan is not None else read_rt(patient_dir, options)
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
    if not files and not damaged:  # nothing to predict: one error, never a failed "plan" per stray file
        only = ""
        if archives:
            shown = ", ".join(a.folder for a in archives[:3]) + (f" and {len(archives) - 3} more" if len(archives) > 3
                                                                 else "")
            only = (f", only {len(archives)} archive(s) or compressed file(s) that predict --dicom does not unpack "
                    f"({shown}); if they are exports, unpack them into the export root (import_dicom reads archives)")
        raise FlaxdoseError(f"no DICOM files found under {root}{only}; give the folder of the DICOM-RT exports")
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
    rd = DicomFile(Path(rtdose_path), "RTDOSE", RTDOSE_STORAGE, "", "", "", "", plan.for_uid, dose_summation="PLAN")
    on_file = dataclasses.replace(plan, doses=[rd], dose_kind="PLAN", problems=[], notes=[])
    # prescription 0: no plausibility window for a prediction (an under-trained model is reported, not refused)
    case = read_plan(on_file, ReadOptions(structures, "dose", aliases=aliases, prescription_gy=0.0, min_coverage=0.0))
    return case.replace(prescription_gy=float(prescription_gy))


def grid_name(case: Case) -> str:
    """How reports name the grid a case's metrics were computed on: ``RTDOSE grid 2x2.5x2.5 mm, 64x48x32``."""
    what = {"dose": "RTDOSE grid", "model": "model grid", "ct": "CT grid"}.get(case.meta.get("grid"), "case grid")
    return f"{what} {describe_spacing(case.spacing_mm)} mm, {'x'.join(map(str, case.shape))} voxels"


def case_metric_rows(case: Case, specs: Sequence[str], name: str) -> list[dict]:
    """Rows (`METRIC_COLUMNS`) of the paper's DVH metrics (Gy) and the metric `specs` of `case`'s dose."""
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

    buffer = io.StringIO()
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
    from flaxdose import plots  # matplotlib only when figures are drawn

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
    check_writable(out, overwrite, "dicom predictions")
    skipped = []
    plans = find_dicom_plans(root, skipped)
    echo = echo or (lambda line: None)
    echo(f"{len(plans)} plan(s) under {root}; writing {out}")
    for path, why in skipped:
        echo(f"not read: {path}: {why}")
    results = []
    with atomic_folder(out, overwrite, "dicom predictions") as tmp:
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

    keys = list(dict.fromkeys(k for r in results for k in r.metrics))
    columns = ["plan", "status", "prescription_gy", "grid", "rtdose", "error", "warning", *keys]
    buffer = io.StringIO()
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
