"""The OpenKBP study in one command: ``python -m flaxdose.launch.openkbp_study --scale openkbp_cpu --src provided-data --workdir DIR``.

`--src` is the challenge's `provided-data` folder (with `train-pats` and `validation-pats`;
docs/openkbp.md shows how to rebuild it). The study's split: train-pats trains ("train") and
validation-pats validates and is scored ("val"); with ``--tune`` (`tune_split`) only train-pats is
read, ``--tune_val N`` of them (36 by default) are held out as "val" by a fixed seeded shuffle and
the rest trains: settings are chosen without looking at validation-pats. Stages (each recorded in
``DIR/stages.json`` when done; a rerun skips finished stages and training resumes from its
checkpoints; ``DIR/study.json`` holds scale, seed and the tuning split, and another study's
workdir is refused):
1. convert: the "val" patients on the challenge's 128^3 grid (what is scored), with the CT of
   those that have one (``ct.csv``), and every patient of the split on the scale's training grid
   (`--downsample`; one dataset when that is 128^3), with the CT when the study uses it;
   CT subset (scales with ``data.include_ct`` or ``ct_patients_only``): both datasets' splits keep
   only the patients with a CT (`restrict_to_ct`; the manifest's ``ct_subset`` lists who was left out);
2. distance-to-target: fit the non-learned reference model (flaxdose.inference.baseline) on "train";
3. train: the network on "train", validated on "val" (best checkpoint); anneal (optional);
4. evaluate: both models on "val", scored like the challenge on its own grid
   against the original doses (flaxdose.evaluation.openkbp), submission CSVs, figures;
5. grid floor: the reference doses themselves sent through the coarse grid and back, the
   best score any model trained on that grid could reach (``grid_floor/`` per patient);
6. report: ``<results>/openkbp_<scale>.md`` (``--tune``: ``openkbp_<scale>_tune.md``) with tables
   (and, when only some scored patients have a CT, the scores over those), figures, wall time,
   machine load, machine and commit.

``--compare DIR1,DIR2,... --out TABLE.md`` (`compare_studies`) writes one Markdown table of finished
study workdirs: dose and DVH scores over all scored patients and over those with a CT, and the
targets' D_99, D_95 and D_1 errors of the network and the distance-to-target model.

Scales (configs/openkbp_study.py): ``smoke`` (seconds, used by a test), ``openkbp_cpu``
(within 40 minutes on a 2-core machine), ``openkbp_cpu_ct`` (the same with the CT as an input; ``smoke_ct``
its test), ``openkbp_cpu_ct_patients`` (masks only, on the CT model's patients), ``openkbp_gpu`` (one short
GPU call, bf16).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from absl import flags
from flaxdose.configs.openkbp_study import SCALES
from flaxdose.launch.paper_study import Stages, results_folder, timing_and_settings

from flaxdose import cli, provenance
from flaxdose import config as config_lib
from flaxdose.checkpoint import find_checkpoint
from flaxdose.data.case import MANIFEST, Dataset
from flaxdose.data.pipeline import cases_with_ct
from flaxdose.errors import FlaxdoseError
from flaxdose.evaluation.openkbp import (
    DISTANCE_REFERENCE,
    NETWORK,
    evaluate_openkbp,
    predict_openkbp,
    score_predictions,
    subset_scores,
    write_score_tables,
)
from flaxdose.inference.baseline import DistanceBaseline
from flaxdose.inference.predictor import Model
from flaxdose.io import atomic_write_text, require_folder
from flaxdose.metrics import OPENKBP_TARGET_METRICS
from flaxdose.model import count_params
from flaxdose.openkbp import OPENKBP_TARGETS, TARGET_PRESCRIPTION_GY, convert_openkbp, find_patients
from flaxdose.training import trainer

FLAGS = flags.FLAGS
# The challenge's best test-phase scores (Babier et al., Med Phys 48:5549, 2021; models using the CT).
PUBLISHED = {"dose_score": 2.43, "dvh_score": 1.48}
# --tune: train-pats in the challenge's order, shuffled by np.random.default_rng(TUNE_SEED) (whatever --seed, so
# that tuning studies of any seed share one split); the first --tune_val patients are held out.
TUNE_SEED, TUNE_VAL = 0, 36
GRID_FLOOR = "grid floor"  # the model name of the grid floor's patients.csv / dvh_metrics.csv


def scale_settings(scale: str) -> dict:
    if scale not in SCALES:
        raise FlaxdoseError(f"unknown scale {scale!r}; choose one of {sorted(SCALES)}")
    return SCALES[scale]


def report_name(scale: str, tune: bool = False) -> str:
    """The report's file stem: ``openkbp_<scale>``, ``..._tune`` for a tuning study (never the real report's)."""
    return (scale if scale.startswith("openkbp") else f"openkbp_{scale}") + ("_tune" if tune else "")


def scored_patients(tune: bool) -> str:
    """What a study scores (and validates on), in words."""
    return "held-out train-pats (tuning split)" if tune else "validation-pats"


def study_config(scale: str, train_data: Path, seed: int, anneal_from: Path | None = None):
    """``configs/openkbp.py:SCALE``, training on `train_data`.

    With `anneal_from`: the second phase, which fine-tunes every parameter of that run's best
    checkpoint at the lower learning rate of the scale's ``anneal`` settings (fresh Adam
    moments, the patches in another order): a step decay of the learning rate, made of two runs.
    """
    overrides = {"data.path": str(train_data), "seed": seed}
    if anneal_from is not None:
        anneal = dict(scale_settings(scale)["anneal"])
        overrides.update({f"train.{k}": v for k, v in anneal.items() if k != "learning_rate"})
        overrides.update({"transfer.mode": "full", "transfer.source": str(anneal_from),
                          "transfer.learning_rate": anneal["learning_rate"], "seed": seed + 1})
    return config_lib.load_config(f"openkbp:{scale}", overrides)


class GridRoundTrip:
    """A "model" that returns each (coarse-grid) case's own reference dose: the grid's floor."""

    name = "reference dose through the grid"

    def predict(self, cases, batch_size: int = 1, progress: bool = False):
        return list(cases)


def fit_distance_reference(train_data: Path, path: Path) -> None:
    dataset = Dataset.open(train_data)
    DistanceBaseline.fit([dataset.load(i) for i in dataset.split("train")], TARGET_PRESCRIPTION_GY).save(path)


def validation_cases(full: Path) -> list:
    dataset = Dataset.open(full)
    return [dataset.load(i) for i in dataset.split("val")]


def evaluate(workdir: Path, network: Path, full: Path, factor: int, mirror: bool, tune: bool = False) -> None:
    models = {NETWORK: Model.load(network, mirror=mirror), DISTANCE_REFERENCE: DistanceBaseline.load(workdir / "distance_to_target.json")}
    references = validation_cases(full)
    note = (f"{scored_patients(tune)} ({len(references)} patients), models trained on a grid {factor}x coarser "
            "than 128^3")
    evaluate_openkbp(models, references, workdir / "eval", factor, overwrite=True, note=note, progress=False)


def grid_floor(workdir: Path, full: Path, factor: int) -> None:
    """``grid_floor.json`` (the scores) and ``grid_floor/`` (per patient, `write_score_tables`)."""
    references = validation_cases(full)
    scores = score_predictions(predict_openkbp(GridRoundTrip(), references, factor), references)
    write_score_tables({GRID_FLOOR: scores}, workdir / "grid_floor")
    (workdir / "grid_floor.json").write_text(json.dumps(scores.summary, indent=2) + "\n")


# ---------------------------------------------------------------- the split and the data
def train_pats(src: str | Path) -> Path:
    """The train-pats folder of `src` (provided-data, or train-pats itself); FlaxdoseError when there is none."""
    src = Path(src)
    folder = src if src.name == "train-pats" else src / "train-pats"
    if not folder.is_dir():
        raise FlaxdoseError(f"{src} has no train-pats folder; --tune reads only the challenge's train-pats: pass the "
                            "provided-data folder (or its train-pats)")
    return folder


def tune_split(patients: Sequence[str], n_val: int) -> dict[str, list[str]]:
    """The tuning split of train-pats: ``{"train": [...], "val": [...]}``, each in the order of `patients`.

    `patients` (pt_N folder names, the challenge's order) are shuffled by
    ``np.random.default_rng(TUNE_SEED).permutation``; the first `n_val` are "val", the rest "train". The
    same patients always give the same split (36 of the 196 train-pats, about 18 %, by default). Raises
    FlaxdoseError unless 1 <= n_val < len(patients).
    """
    patients = list(patients)
    if not 1 <= n_val < len(patients):
        raise FlaxdoseError(f"--tune_val {n_val} cannot hold out part of {len(patients)} train-pats patients; give "
                            f"1 to {len(patients) - 1}")
    held = {patients[i] for i in np.random.default_rng(TUNE_SEED).permutation(len(patients))[:n_val]}
    return {"train": [p for p in patients if p not in held], "val": [p for p in patients if p in held]}


def study_splits(src: str | Path, tune_val: int | None = None) -> tuple[Path, dict[str, list[str]]]:
    """(the folder to convert from, split name -> pt_N folder names) of a study.

    Without `tune_val`: `src` and its folders' splits (train-pats "train", validation-pats "val", test-pats
    "test"), FlaxdoseError when train-pats or validation-pats is missing. With it: `train_pats` of `src`
    (nothing else under `src` is listed) and its `tune_split`.
    """
    if tune_val is not None:
        folder = train_pats(src)
        return folder, tune_split([p.name for _, p in find_patients(folder)], tune_val)
    splits: dict[str, list[str]] = {}
    for split, patient in find_patients(src):
        splits.setdefault(split, []).append(patient.name)
    missing = {"train", "val"} - set(splits)
    if missing:
        raise FlaxdoseError(f"{src} lacks the challenge's {sorted(missing)} patients; pass a provided-data folder "
                            "with train-pats and validation-pats (or --tune, which reads only train-pats)")
    return Path(src), splits


def conversions(full: Path, train_data: Path, factor: int, tune: bool = False, training_ct: bool = False) -> list[tuple]:
    """(stage name, dataset, grid factor, the splits it keeps (None: all), whether the CT is kept) of the convert
    stages.

    Only the "val" patients are needed on the challenge's grid (they are scored there), with their CT where
    they have one (which of them have a CT is what the report's CT table needs); every patient of the split
    goes onto the training grid, with the CT only for `training_ct` (a model that reads it, or a study on the
    patients with a CT: it is the largest volume of a coarse case). One dataset when the training grid is the
    challenge's.
    """
    which = "train-pats " if tune else ""
    if factor == 1:
        return [(f"convert {which}".strip(), full, 1, None, True)]
    return [("convert held-out train-pats" if tune else "convert validation-pats", full, 1, ("val",), True),
            (f"convert {which}at {128 // factor}^3", train_data, factor, None, training_ct)]


def convert(src: str | Path | None, out: Path, factor: int, keep: Sequence[str] | None = None,
            include_ct: bool = True, tune_val: int | None = None) -> None:
    """Convert the study's patients (`study_splits`; the splits named in `keep`, None: all) into `out`; with
    `include_ct`, the CT of every patient that has one (the others are converted without)."""
    if src is None:
        raise FlaxdoseError("--src (the challenge's provided-data folder) is needed to convert the data")
    folder, splits = study_splits(src, tune_val)
    if keep is not None:
        splits = {k: v for k, v in splits.items() if k in keep}
    convert_openkbp(folder, out, include_ct=include_ct, overwrite=True, progress=False, downsample=factor,
                    splits=splits)


CT_SUBSET = "ct_subset"  # the manifest key `restrict_to_ct` writes


def restrict_to_ct(root: str | Path) -> dict[str, list[str]]:
    """Keep only the cases with a CT in the splits of the dataset at `root`, for a model that reads the CT.

    The case files stay; ``manifest.json`` is rewritten (atomically) with every split reduced to its cases
    with a CT (`flaxdose.data.pipeline.cases_with_ct`, in their order) and ``ct_subset``: ``{"left_out":
    {split: [case ids]}}``, the cases taken out. A dataset that already has ``ct_subset`` is left as it is.
    Returns the left-out ids per split. Raises FlaxdoseError when the "train" or "val" split has no case with a CT.
    """
    dataset = Dataset.open(root)
    if CT_SUBSET in dataset.manifest:
        return dict(dataset.manifest[CT_SUBSET]["left_out"])
    kept = {split: cases_with_ct(dataset, ids) for split, ids in dataset.splits.items()}
    empty = [split for split in ("train", "val") if split in kept and not kept[split]]
    if empty:
        raise FlaxdoseError(f"no case of split {empty} of {dataset.root} has a CT, and the model reads the CT "
                            "(data.include_ct); unpack the CT pack (../shared/openkbp/README.md, 'The CT') into the "
                            "provided-data folder and use a new --workdir, or a scale without data.include_ct")
    left_out = {split: [i for i in ids if i not in kept[split]] for split, ids in dataset.splits.items()}
    manifest = {**dataset.manifest, "splits": kept, CT_SUBSET: {
        "rule": "splits keep only the cases with a CT (flaxdose.launch.openkbp_study.restrict_to_ct)",
        "left_out": left_out}}
    atomic_write_text(Path(root) / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    return left_out


def run_study(scale: str, src: str | Path, workdir: str | Path, results: str | Path, seed: int = 0,
              data_only: bool = False, tune_val: int | None = None) -> Path:
    """Run (or resume) every stage; the report's path. `data_only`: stop after converting (workdir's path).

    `tune_val` (``--tune_val``, with ``--tune``): a tuning study on train-pats alone, that many patients held
    out (`tune_split`). Raises FlaxdoseError for a workdir of another study (scale, seed or tuning split).
    """
    settings = scale_settings(scale)
    factor, tune = settings["downsample"], tune_val is not None
    workdir = require_folder(workdir, "--workdir")
    full = workdir / "data" / "openkbp"
    train_data = full if factor == 1 else workdir / "data" / f"openkbp_{factor}x"
    if src is not None and not Path(src).is_dir():  # before the workdir is made
        raise FlaxdoseError(f"--src {src} is not a folder; pass the challenge's provided-data folder (with "
                            "train-pats and validation-pats)")
    if tune and tune_val < 1:  # before any work (tune_split checks it against the patients too)
        raise FlaxdoseError(f"--tune_val {tune_val}: hold out at least one train-pats patient (default {TUNE_VAL})")
    workdir.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    # a real study's record is unchanged by --tune (its workdirs resume); a tuning study's names its split
    study = {"scale": scale, "seed": seed, **({"tune": True, "tune_val": tune_val} if tune else {})}
    stages = Stages(workdir, "openkbp_study", study=study)
    config = study_config(scale, train_data, seed)
    ct_only = bool(config.data.get("include_ct", False) or settings.get("ct_patients_only", False))
    for name, out, grid_factor, keep, ct in conversions(full, train_data, factor, tune, ct_only):
        stages.run(name, lambda args=(src, out, grid_factor, keep, ct, tune_val): convert(*args))
    if ct_only:
        stages.run("CT subset", lambda: [restrict_to_ct(root) for root in dict.fromkeys((full, train_data))])
    missing = {"train", "val"} - set(Dataset.open(train_data).splits)
    if missing:
        raise FlaxdoseError(f"{src} lacks the challenge's {sorted(missing)} patients; pass a provided-data folder "
                            "with train-pats and validation-pats")
    if data_only:
        return workdir
    stages.run("distance-to-target", lambda: fit_distance_reference(train_data, workdir / "distance_to_target.json"))
    stages.run("train", lambda: trainer.train_and_evaluate(config, workdir / "model"))
    network, configs = workdir / "model", [config]
    if settings.get("anneal"):
        configs.append(study_config(scale, train_data, seed, anneal_from=network))
        network = workdir / "model_annealed"
        stages.run("anneal", lambda: trainer.train_and_evaluate(configs[-1], network))
    stages.run("evaluate", lambda: evaluate(workdir, network, full, factor, settings.get("mirror", False), tune))
    if factor > 1:
        stages.run("grid floor", lambda: grid_floor(workdir, full, factor))
    load = {"before": load_before, "after": os.getloadavg()}
    return write_report(scale, settings, configs, network, workdir, Path(results), stages.done, load, tune_val)


# ---------------------------------------------------------------- scores of a finished study
def network_folder(workdir: Path) -> Path:
    """The network the study scored: the annealed model when the scale anneals, else the first."""
    return workdir / "model_annealed" if (workdir / "model_annealed").is_dir() else workdir / "model"


def study_scores(workdir: str | Path) -> dict:
    """The scores of a finished study workdir, from its evaluation's and grid floor's CSVs (`subset_scores`).

    Returns ``{"study": study.json, "inputs": {"include_ct", "target_distance"} of the network's config,
    "patients": scored ids, "ct_patients": those with a CT, "all": {model: subset_scores}, "ct": the same over
    ct_patients (None when no scored patient has a CT)}``; models are the network, the distance-to-target
    model and, when recorded, the grid floor. Raises FlaxdoseError for a workdir without an evaluation.
    """
    workdir = Path(workdir)
    if not (workdir / "eval" / "patients.csv").is_file():
        raise FlaxdoseError(f"{workdir} holds no finished OpenKBP study (no eval/patients.csv); run "
                            "python -m flaxdose.launch.openkbp_study on it to the end first")
    study = json.loads((workdir / "study.json").read_text()) if (workdir / "study.json").is_file() else {}
    folders = [workdir / "eval"] + ([workdir / "grid_floor"] if (workdir / "grid_floor" / "patients.csv").is_file() else [])
    every = {name: s for folder in folders for name, s in subset_scores(folder).items()}
    patients = list(dict.fromkeys(subset_ids(workdir / "eval")))
    ct_patients = cases_with_ct(Dataset.open(workdir / "data" / "openkbp"), patients)
    ct = {name: s for folder in folders for name, s in subset_scores(folder, ct_patients).items()} if ct_patients else None
    config_file = network_folder(workdir) / "config.json"
    data = config_lib.load_config_json(config_file).data if config_file.is_file() else {}
    inputs = {"include_ct": bool(data.get("include_ct", False)), "target_distance": data.get("target_distance", False)}
    return {"study": study, "inputs": inputs, "patients": patients, "ct_patients": ct_patients, "all": every, "ct": ct}


def subset_ids(folder: Path) -> list[str]:
    """The patients an evaluation folder scored (its patients.csv, the first model's rows)."""
    with open(folder / "patients.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    first = rows[0]["model"] if rows else None
    return [row["case_id"] for row in rows if row["model"] == first]


# ---------------------------------------------------------------- report
def _patients(n: int) -> str:
    return f"{n} patient" + ("" if n == 1 else "s")


def _row(name: str, scores: dict, note: str) -> str:
    return f"| {name} | {scores['dose_score']:.2f} | {scores['dvh_score']:.2f} | {note} |"


def inputs_words(include_ct: bool, target_distance) -> str:
    """The network's inputs in a few words: "masks only", "masks + CT", "masks + per-target distances + CT"."""
    distance = {False: "", True: " + target distance", "per_target": " + per-target distances"}.get(target_distance,
                                                                                                   " + distance")
    return ("masks" + distance + (" + CT" if include_ct else "")) if (distance or include_ct) else "masks only"


def write_report(scale: str, settings: dict, configs: list, network: Path, workdir: Path, results: Path, times: dict,
                 load: dict, tune_val: int | None = None) -> Path:
    tune = tune_val is not None
    name = report_name(scale, tune)
    figures = results / name
    if figures.exists():
        shutil.rmtree(figures)
    figures.mkdir(parents=True)
    summary = json.loads((workdir / "eval" / "summary.json").read_text())
    scores = summary["scores"]
    n = scores[NETWORK]["num_cases"]
    factor = settings["downsample"]
    grid = 128 // factor
    config = configs[0]
    include_ct = bool(config.data.get("include_ct", False))
    inputs = inputs_words(include_ct, config.data.get("target_distance", False))
    params = count_params(Model.load(network).params)
    scored = scored_patients(tune)
    network_name = f"flaxdose network ({params:,} parameters, {inputs})"
    floor_name = f"reference dose sent through the {grid}^3 grid and back"
    rows = [_row(network_name, scores[NETWORK], f"{scored}, {_patients(n)}"),
            _row("distance-to-target model (non-learned)", scores[DISTANCE_REFERENCE], f"{scored}, {_patients(n)}")]
    if (workdir / "grid_floor.json").is_file():
        floor = json.loads((workdir / "grid_floor.json").read_text())
        rows.append(_row(floor_name, floor, "the floor of this grid: no model trained on it can do better"))
    rows.append(_row("best challenge entry (published)", PUBLISHED,
                     "test-pats (100 patients), used the CT; Babier et al. 2021"))
    found = study_scores(workdir)
    ct_section = []
    if found["ct"] and len(found["ct_patients"]) < len(found["patients"]):  # some scored patients have a CT, some not
        k = len(found["ct_patients"])
        names = {NETWORK: network_name, DISTANCE_REFERENCE: "distance-to-target model (non-learned)",
                 GRID_FLOOR: floor_name}
        ct_section = [f"### Patients with a CT (n = {k} of {len(found['patients'])})", "",
                      "The same models over the scored patients that have a CT (`ct.csv`), from the per-patient "
                      "tables (`flaxdose.evaluation.openkbp.subset_scores`): the patients a model that reads the CT "
                      "is scored on, so that masks-only and masks + CT studies compare on the same patients.", "",
                      "| model | dose score (Gy) | DVH score (Gy) | patients |", "|---|---|---|---|",
                      *[_row(names.get(m, m), s, f"{scored} with a CT, {_patients(k)}") for m, s in found["ct"].items()],
                      ""]
    manifest = Dataset.open(config.data.path).manifest
    train_ids = manifest["splits"]["train"]
    left_out = manifest.get(CT_SUBSET, {}).get("left_out", {})
    n_left = {split: len(left_out.get(split, [])) for split in ("train", "val")}
    ct_note = (" Only patients with a CT" + (" (the network reads it)" if include_ct else " (the same patients as a CT "
               "model's)") + f": {_patients(n_left['train'])} of the training and {_patients(n_left['val'])} of the "
               "scored part without one were left out (`restrict_to_ct`)." if CT_SUBSET in manifest else "")
    if tune:
        data = ("Data: the AAPM OpenKBP challenge's head-and-neck IMRT plans, **`train-pats` only** (a tuning "
                "study: no other patient was read). Its patients, in the challenge's order, are shuffled with "
                f"`numpy.random.default_rng({TUNE_SEED})` and the first {tune_val} are held out "
                f"(`flaxdose.launch.openkbp_study.tune_split`): they validate (the best checkpoint by validation "
                f"loss) and are scored, the other {len(train_ids) + n_left['train']} train." + ct_note + " ")
    else:
        data = ("Data: the AAPM OpenKBP challenge's head-and-neck IMRT plans, `train-pats` "
                f"({len(train_ids) + n_left['train']} patients in our copy) trains and `validation-pats` validates "
                "(the best checkpoint by validation loss) and is scored." + ct_note + " ")
    channels = ("the ten structure masks in the challenge's order"
                + {True: ", the signed distance to the targets", "per_target": ", the signed distance to each target"}
                .get(config.data.get("target_distance", False), "")
                + ("; the CT (HU)." if include_ct else "; no CT."))
    mean_load = lambda key: ", ".join(f"{x:.1f}" for x in load[key])
    lines = [
        f"# OpenKBP, scale `{scale}`" + (f": tuning split of train-pats ({tune_val} held out)" if tune else ""), "",
        f"Produced by `python -m flaxdose.launch.openkbp_study --scale {scale}"
        + (f" --tune --tune_val {tune_val}" if tune else "") + f"` on {time.strftime('%Y-%m-%d')}, "
        f"commit `{provenance.commit() or 'unknown'}`, machine: {provenance.machine()}. "
        f"Load average (1, 5, 15 min) at the start {mean_load('before')}, at the end {mean_load('after')} "
        f"(the machine's cores are shared; a load above the core count slows every stage).", "",
        data + f"Inputs: {channels} "
        + (f"Training grid: {grid}^3, {factor}x the challenge's voxel size along every axis "
           "(`flaxdose.openkbp.downsample_case`). " if factor > 1 else "Training grid: the challenge's 128^3. ")
        + "Scores are computed on the challenge's own 128^3 grid against the original doses: the "
        "prediction is brought back with `flaxdose.openkbp.upsample_dose` (cubic spline, normalized by the "
        "possible-dose mask) and multiplied by the possible-dose mask, as the challenge does.", "",
        "## Scores", "",
        "Dose score: mean absolute dose error inside the possible-dose mask, averaged over patients. DVH score: "
        "mean absolute error of the challenge's DVH metrics (OAR D_0.1_cc and mean, target D_99, D_95, D_1), "
        "pooled over patients, ROIs and metrics. Gy, lower is better (`flaxdose.metrics.openkbp_scores`).", "",
        "| model | dose score (Gy) | DVH score (Gy) | patients |", "|---|---|---|---|", *rows, "",
        "The distance-to-target model predicts each voxel's dose from its signed distance to the nearest target, a step "
        "function of distance fitted on the training patients (median dose / target level per 2.5 mm; "
        "`flaxdose.inference.baseline.DistanceBaseline`).", "", *ct_section,
        "## Per metric", "",
        (workdir / "eval" / "report.md").read_text().split("Mean absolute error of each DVH metric (Gy):", 1)[1].strip(),
        "",
    ]
    # Only aggregate figures leave the run folder: a patient's dose slice is challenge data.
    for png in (p for p in summary["figures"] if not p.startswith("case_")):
        shutil.copy(workdir / "eval" / png, figures / png)
        lines.append(f"![{Path(png).stem}]({figures.name}/{png})")
    lines += ["", "The dose slice and DVHs of one scored patient (`case_<id>.png` in `<workdir>/eval/`) and the "
              "submission CSVs of both models (the challenge's format, one `pt_N.csv` per patient, in "
              "`<workdir>/eval/submission/`) stay in the run folder (not committed: they hold challenge data).", "",
              "## Training", "",
              f"UNet features {tuple(config.model.features)}, {config.model.convs_per_level} convs per level, "
              f"GroupNorm {'before' if config.model.norm_order == 'norm_relu' else 'after'} the ReLU, "
              f"{'ICNR' if config.model.get('upsample_init') == 'icnr' else 'default'} up-sampling init, "
              f"{config.model.dtype}, patches {'x'.join(map(str, config.data.patch_shape))} around the targets "
              f"(sigma {tuple(config.data.patch_sigma)} voxels), left-right flips"
              + ("; predictions average the case and its left-right mirror image." if settings.get("mirror") else "."),
              ""]
    for phase, (c, folder) in zip(("train", "anneal"), zip(configs, ("model", "model_annealed"))):
        rate = c.transfer.learning_rate if c.transfer.mode != "none" else c.train.learning_rate
        lines.append(f"- {phase}: {c.train.steps} steps of {c.train.batch_size} patches, Adam {rate:g}"
                     + (f" ({c.train.schedule})" if c.train.get("schedule", "constant") != "constant" else "")
                     + (f", target voxels weighted {c.train.target_weight:g}x in the MSE"
                        if c.train.get("target_weight", 1.0) != 1.0 else "")
                     + (", starting from the train phase's best checkpoint" if phase == "anneal" else "")
                     + f"; best checkpoint by validation loss: step {find_checkpoint(workdir / folder, 'best')[1]}.")
    lines += ["", *timing_and_settings(times, settings)]
    report = results / f"{name}.md"
    report.write_text("\n".join(lines))
    return report


# ---------------------------------------------------------------- studies side by side
TARGET_KEYS = tuple(f"{t} {m}" for t in OPENKBP_TARGETS for m in OPENKBP_TARGET_METRICS)


def _cell(scores: Mapping[str, dict] | None, model: str, key: str) -> str:
    value = (scores or {}).get(model, {}).get(key)
    return "-" if value is None else f"{value:.2f}"


def scored_split(study: dict) -> str:
    """What a study (its study.json) scored, for comparisons: "validation-pats", or "train-pats split (N held
    out)": `scored_patients` with the held-out count, as the comparison table shows it."""
    return f"train-pats split ({study.get('tune_val')} held out)" if study.get("tune") else "validation-pats"


def compare_studies(workdirs: Sequence[str | Path], out: str | Path) -> Path:
    """One Markdown file comparing finished study workdirs (`study_scores`); returns `out`.

    Table 1, per study: its scale, seed, what it scored (validation-pats, or a tuning split of train-pats),
    the network's inputs, and the dose and DVH scores (Gy) of the network, the distance-to-target model and
    the grid floor, over all scored patients and over those with a CT. Tables 2 (and 3, when some study
    scored patients without a CT): each target's D_99, D_95 and D_1 error, signed mean (prediction -
    reference) and mean absolute error in parentheses (Gy), network vs distance-to-target model. Raises
    FlaxdoseError for an unfinished workdir or an empty list.
    """
    if not workdirs:
        raise FlaxdoseError("--compare needs at least one study workdir (DIR1,DIR2,...)")
    missing = [str(w) for w in workdirs if not Path(w).is_dir()]
    if missing:
        raise FlaxdoseError(f"--compare: {', '.join(missing)} does not exist; give finished study workdirs")
    if len({Path(w).resolve() for w in workdirs}) < len(workdirs):
        raise FlaxdoseError("--compare names the same study twice; give each workdir once")
    studies = {str(w): study_scores(w) for w in workdirs}
    scored = {scored_split(s["study"]) for s in studies.values()}
    if len(scored) > 1:
        raise FlaxdoseError(f"--compare: these studies scored different patients ({'; '.join(sorted(scored))}); "
                            "compare tuning studies of one split with each other, and real studies with each other")
    models = (NETWORK, DISTANCE_REFERENCE, GRID_FLOOR)
    lines = ["# OpenKBP studies compared", "",
             f"Written by `python -m flaxdose.launch.openkbp_study --compare` on {time.strftime('%Y-%m-%d')}. "
             "Scores in Gy, lower is better (the challenge's dose and DVH scores, "
             "`flaxdose.evaluation.openkbp.subset_scores`); \"with a CT\": the scored patients that have a CT, the "
             "patients a masks + CT model is scored on. A tuning study scored held-out train-pats, not "
             "validation-pats: compare it only with tuning studies of the same split.", "",
             "| study | scale | seed | scored | inputs | patients | network dose | network DVH | distance dose | "
             "distance DVH | grid floor dose | grid floor DVH |", "|---" * 12 + "|"]
    for folder, found in studies.items():
        info, inputs = found["study"], found["inputs"]
        scored = scored_split(info)
        head = (f"| `{Path(folder).name}` | {info.get('scale', '?')} | {info.get('seed', '?')} | {scored} | "
                f"{inputs_words(inputs['include_ct'], inputs['target_distance'])} |")
        for label, which, n in (("all", "all", len(found["patients"])), ("with a CT", "ct", len(found["ct_patients"]))):
            if n:
                cells = [_cell(found[which], m, k) for m in models for k in ("dose_score", "dvh_score")]
                lines.append(f"{head} {label}: {n} | " + " | ".join(cells) + " |")
    subsets = [("all", "all scored patients")]
    if any(found["ct"] and len(found["ct_patients"]) < len(found["patients"]) for found in studies.values()):
        subsets.append(("ct", "the scored patients with a CT"))
    for which, words in subsets:
        lines += ["", f"Target DVH metrics over {words}: signed mean error (mean absolute error), Gy, "
                  "network | distance-to-target model.", "",
                  "| metric | " + " | ".join(f"`{Path(f).name}` network | `{Path(f).name}` distance" for f in studies)
                  + " |", "|---" * (1 + 2 * len(studies)) + "|"]
        for key in TARGET_KEYS:
            cells = []
            for found in studies.values():
                for model in (NETWORK, DISTANCE_REFERENCE):
                    s = (found[which] or {}).get(model)
                    mean = s and s["metric_mean_error_gy"].get(key)
                    cells.append("-" if mean is None else f"{mean:+.2f} ({s['metric_mae_gy'][key]:.2f})")
            lines.append(f"| {key} | " + " | ".join(cells) + " |")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def define_flags() -> None:
    """The command's flags (defined only when run as a program, so tests can import the module)."""
    flags.DEFINE_enum("scale", "smoke", sorted(SCALES), "study size")
    flags.DEFINE_string("src", None, "the challenge's provided-data folder (train-pats, validation-pats)")
    flags.DEFINE_string("workdir", None, "study folder (datasets, models, evaluation)")
    flags.DEFINE_string("results", None, "where the Markdown report and figures go (default: WORKDIR/report; "
                      "--results docs/results updates the committed reports)")
    flags.DEFINE_integer("seed", 0, "seed of the initialisation and the patches")
    flags.DEFINE_bool("data_only", False, "stop after converting: prepare a workdir to carry to a GPU machine")
    flags.DEFINE_bool("tune", False, "a tuning study: read only train-pats, hold --tune_val of them out (a fixed "
                      "seeded shuffle) to validate and score; validation-pats is never read. Its report is "
                      "openkbp_<scale>_tune.md")
    flags.DEFINE_integer("tune_val", TUNE_VAL, "with --tune: how many train-pats patients are held out")
    flags.DEFINE_list("compare", None, "finished study workdirs DIR1,DIR2,...: write one table of their scores "
                      "to --out instead of running a study")
    flags.DEFINE_string("out", None, "with --compare: the Markdown file to write")


def main(argv):
    del argv
    usage = ("usage: python -m flaxdose.launch.openkbp_study --scale openkbp_cpu [--tune] --src PROVIDED_DATA "
             "--workdir DIR, or --compare DIR1,DIR2 --out TABLE.md")
    if FLAGS.compare:
        if not FLAGS.out:
            raise FlaxdoseError("--out is missing: the Markdown file --compare writes (e.g. --out compare.md)")
        print(f"[openkbp_study] comparison: {compare_studies(FLAGS.compare, FLAGS.out)}")
        return
    if not FLAGS.workdir:
        raise FlaxdoseError(f"--workdir is missing: the study's folder; {usage}")
    if not (FLAGS.src or (Path(FLAGS.workdir) / "stages.json").is_file()):
        raise FlaxdoseError(f"--src is missing: the challenge's provided-data folder (train-pats, validation-pats; "
                            f"for --scale smoke: ../shared/openkbp-sample); {usage}")
    results = results_folder(FLAGS.results, FLAGS.workdir)
    done = run_study(FLAGS.scale, FLAGS.src, FLAGS.workdir, results, FLAGS.seed, FLAGS.data_only,
                     FLAGS.tune_val if FLAGS.tune else None)
    print(f"[openkbp_study] {'data' if FLAGS.data_only else 'report'}: {done}")


def run():
    """Console script ``flaxdose-openkbp-study``."""
    cli.run(main, define_flags)


if __name__ == "__main__":
    run()
