"""Model packages: a trained model as one self-describing folder, to share and to load by path.

``python -m flaxdose.export_model --workdir W --out PKG`` (`export_model`) writes

    PKG/flaxdose_model.json   what the model is (like a MONAI bundle's metadata.json): inputs and
                              their channel order, voxel spacing, the prescription normalisation,
                              structures, a training-data summary (counts only), versions, intended
                              use, and the SHA-256 of every file and of the package itself
    PKG/config.json           the part of the run config the model needs: ``model`` and
                              ``data.{structures, patch_shape, target_distance, include_ct}``
                              (its inputs, `flaxdose.data.pipeline.InputSpec`)
    PKG/params.npz            the weights of the run's best checkpoint (or latest: ``which``), one
                              array per parameter path (``encoder/.../kernel``), no pickle, the same
                              bytes for the same weights

`read_package` (through `flaxdose.inference.Model.load`, i.e. every ``--workdir``/``--workdirs``
flag that loads a model) reads a package wherever it reads a training workdir and predicts
exactly what the workdir predicts. Before anything is used, every file's hash and the package
hash are checked: a changed, missing or damaged file, or a package of a newer format than this
flaxdose reads, is a FlaxdoseError naming the problem and the fix.

No patient names, IDs or folder paths are written: the training data is described by counts,
styles, grids, spacings and prescriptions, never by case ids (an import with ``--keep_ids``
uses patient IDs as case ids) or the dataset's location (its folder may name the patient).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Mapping
from pathlib import Path

import jax
import ml_collections
import numpy as np

from flaxdose import __version__, provenance
from flaxdose import config as config_lib
from flaxdose.checkpoint import restore_params
from flaxdose.data.pipeline import InputSpec
from flaxdose.errors import FlaxdoseError
from flaxdose.inference.spacing import accepted_spacing
from flaxdose.io import atomic_folder, check_writable
from flaxdose.model import UNetSpec, init_params
from flaxdose.run import PACKAGE_METADATA as METADATA
from flaxdose.run import SPACING_KEY, Run, is_package, require_workdir

log = logging.getLogger("flaxdose")

FORMAT = "flaxdose-model-package"
FORMAT_VERSION = 1  # the newest layout this flaxdose reads and the one it writes
CONFIG = "config.json"
PARAMS = "params.npz"
INTENDED_USE = (
    "Research and education: dose prediction for prostate VMAT planning studies and plan QA research. Not for "
    "clinical use without commissioning: before any clinical use, the clinic must validate this model on its own "
    "plans, planning system and structure naming, and take responsibility for that use. The predicted dose is an "
    "estimate of a plan's achievable dose, not a calculated or deliverable dose."
)
EXPORT_COMMAND = "python -m flaxdose.export_model --workdir W --out PKG"


def package_root(path: str | os.PathLike) -> Path:
    """The package folder of `path` (the folder itself, or the folder of its `METADATA` file)."""
    path = Path(path)
    return path.parent if path.name == METADATA and path.is_file() else path


# ---------------------------------------------------------------- hashing and files
def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def package_hash(metadata: Mapping) -> str:
    """SHA-256 of the metadata (every field but ``package_sha256`` itself, canonical JSON); the metadata holds
    every file's hash, so this one hash stands for the whole package."""
    body = {k: v for k, v in metadata.items() if k != "package_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def flatten_params(params) -> dict:
    """{"encoder/level_0/.../kernel": leaf} of a nested parameter mapping (arrays, or shapes of `jax.eval_shape`)."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict:
    nested: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = nested
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return nested


def write_params(params, path: Path) -> None:
    """The parameters as an uncompressed npz with fixed member timestamps: the same weights, the same bytes."""
    with open(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, array in sorted(flatten_params(params).items()):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(np.asarray(array)), allow_pickle=False)


# ---------------------------------------------------------------- writing
def model_config(config) -> ml_collections.ConfigDict:
    """The part of a run config a package keeps: what builds and feeds the network, nothing about where the
    data lay or which cases trained it (``data.path``, ``data.train_cases`` may name patients)."""
    inputs = InputSpec.from_config(config)
    return ml_collections.ConfigDict({
        "model": config.model.to_dict(),
        "data": {"structures": list(config.data.structures), "patch_shape": list(config.data.patch_shape),
                 **inputs.config_values()},
    })


def training_summary(run: Run) -> dict:
    """Counts of the run's training data, never case ids or paths: cases per role, styles, grids, voxel
    spacings and prescriptions of the cases it saw (`Run.split_ids`). ``{"available": False, ...}`` when the
    data is gone."""
    config = run.config
    summary = {"kind": str(config.data.kind)}
    try:
        train, val = run.split_ids()
        dataset, seen = run.dataset(), train + val
    except FlaxdoseError:
        log.warning("the training data of %s cannot be read: the package records no training-data summary",
                    run.workdir)
        return {**summary, "available": False,
                "note": "the training dataset could not be read when the package was exported"}
    n_val = len(val)
    styles, shapes, spacings, prescriptions = {}, {}, set(), []
    for case_id in seen:
        with np.load(dataset.case_path(case_id), allow_pickle=False) as z:
            style = str(z["style"]) or "unnamed"
            styles[style] = styles.get(style, 0) + 1
            shape = "x".join(str(int(v)) for v in z["shape"])
            shapes[shape] = shapes.get(shape, 0) + 1
            spacings.add(tuple(round(float(v), 4) for v in z["spacing_mm"]))
            prescriptions.append(float(z["prescription_gy"]))
    synth = dataset.manifest.get("synth") or {}
    summary.update({
        "available": True,
        "cases": {"training": len(seen) - n_val, "validation": n_val,
                  "other_splits": {k: len(v) for k, v in dataset.splits.items()
                                   if k not in (config.data.train_split, "val")}},
        "note": "validation cases chose the checkpoint; other splits were not seen in training",
        "styles": styles,
        "grid_voxels": shapes,
        "voxel_spacing_mm": [list(s) for s in sorted(spacings)],
        "prescription_gy": {"min": min(prescriptions), "max": max(prescriptions)} if prescriptions else None,
    })
    if synth:
        summary["generator"] = {k: synth[k] for k in ("generator", "generator_version") if k in synth}
    return summary


def export_model(workdir: str | os.PathLike, out: str | os.PathLike, *, which: str = "best", name: str | None = None,
                 overwrite: bool = False) -> dict:
    """Write the model of the training run `workdir` (its `which` checkpoint: "best" or "latest") as a package
    folder `out` (module docstring), atomically; the metadata written.

    `name` (default: the workdir's folder name) names the model in predictions and QA reports (a QA
    calibration made with the workdir fits the package when the names agree). Raises FlaxdoseError
    when `workdir` is no training run (or a package already), has no checkpoint, its training voxel
    spacing is unknown (a package must let every prediction check it), or `out` holds files (unless
    `overwrite`; never a training run).
    """
    workdir = Path(workdir)
    if is_package(workdir):
        raise FlaxdoseError(f"{workdir} is already a model package; copy the folder to share it, or give the "
                            "training workdir it was exported from")
    require_workdir(workdir, "--workdir")
    check_writable(out, overwrite, "model package")
    run = Run.open(workdir, which)
    config = run.config
    kept = model_config(config)
    spec = UNetSpec.from_config(kept.model)
    template = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
    params, meta = restore_params(run.checkpoint, template)
    spacing = meta.get(SPACING_KEY)
    if spacing is None:
        try:
            spacing = run.recovered_spacing()
        except FlaxdoseError as e:
            raise FlaxdoseError(f"the run {workdir} stores no training voxel spacing and its training data cannot be "
                                f"read ({e}); a package must carry it (predictions check every case against it): "
                                "export from a run whose data is at hand, or retrain it with this flaxdose") from None
    lo, hi = accepted_spacing(spacing)
    structures = list(kept.data.structures)
    inputs = InputSpec.from_config(kept)
    channels = inputs.channel_names()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "name": name or run.name,
        "intended_use": INTENDED_USE,
        "flaxdose_version": __version__,
        "flaxdose_commit": provenance.commit(),
        "jax_version": jax.__version__,
        "model": {"architecture": "flaxdose.model.UNet3D", **{k: v for k, v in kept.model.to_dict().items()},
                  "parameters": int(sum(int(np.size(a)) for a in flatten_params(params).values()))},
        "inputs": {
            "channels": channels,
            "array": "(x, y, z, channel), float32; x right to left, y anterior to posterior, z inferior to superior "
                     "(DICOM patient axes)",
            "structures": structures,
            "ct_required": inputs.include_ct,
            "voxel_spacing_mm": {"trained_on": spacing, "accepted": {"min": [round(float(v), 4) for v in lo],
                                                                     "max": [round(float(v), 4) for v in hi]}},
            "window_voxels": list(kept.data.patch_shape),
            "inference": "sliding windows of window_voxels, 50 % overlap, Gaussian blending",
        },
        "output": {
            "quantity": "dose / prescription (1.0 = the prescription dose)",
            "normalisation": "trained on each plan's dose divided by its prescription (Gy); a prediction in Gy is the "
                             "output x the plan's prescription (the RTPLAN's, or --prescription_gy), clipped at 0 "
                             "and zero outside the body",
        },
        "training": {"checkpoint": which, "step": meta.get("step"), "validation_loss": meta.get("val_loss"),
                     "steps_planned": int(config.train.steps) if "train" in config else None,
                     "data": training_summary(run)},
    }
    transfer = config.get("transfer") or {}
    if transfer.get("mode", "none") != "none":  # as flaxdose.training.transfer.is_transfer
        metadata["training"]["fine_tuned"] = {
            "mode": transfer.get("mode"), "source_model": Path(str(transfer.get("source", ""))).name,
            "note": "fine-tuned from a source model: the data summary counts the fine-tuning plans only, not the "
                    "source model's training plans"}
    with atomic_folder(out, overwrite, "model package") as tmp:
        (tmp / CONFIG).write_text(config_lib.to_json(kept))
        write_params(params, tmp / PARAMS)
        metadata["files"] = {n: sha256_file(tmp / n) for n in (CONFIG, PARAMS)}
        metadata["package_sha256"] = package_hash(metadata)
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
    return metadata


# ---------------------------------------------------------------- reading
def read_metadata(path: str | os.PathLike) -> dict:
    """The checked metadata of the package at `path`: format and version known, every file present and
    unchanged (its SHA-256), the package hash right. Raises FlaxdoseError naming the problem and the fix."""
    root = package_root(path)
    fix = f"copy the whole package folder again from its source, or export it again ({EXPORT_COMMAND})"
    try:
        metadata = json.loads((root / METADATA).read_text())
    except FileNotFoundError:
        raise FlaxdoseError(f"{root} holds no {METADATA}: it is not a flaxdose model package; give a package "
                            f"folder or a training workdir") from None
    except (OSError, ValueError) as e:
        raise FlaxdoseError(f"the model package {root}: {METADATA} cannot be read ({e}); {fix}") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise FlaxdoseError(f"{root / METADATA} is not a flaxdose model package's metadata (format "
                            f"{metadata.get('format') if isinstance(metadata, dict) else None!r}); {fix}")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise FlaxdoseError(f"the model package {root} has no valid format_version ({version!r}); {fix}")
    if version > FORMAT_VERSION:
        raise FlaxdoseError(f"the model package {root} is of format version {version}, written by flaxdose "
                            f"{metadata.get('flaxdose_version', '?')}; this flaxdose ({__version__}) reads versions up "
                            f"to {FORMAT_VERSION}: upgrade flaxdose (pip install -U flaxdose, or git pull and "
                            "pip install -e .), or ask for a package exported with this version")
    files = metadata.get("files")
    if not isinstance(files, dict) or set(files) != {CONFIG, PARAMS}:
        raise FlaxdoseError(f"the model package {root}: {METADATA} does not list its files ({CONFIG}, {PARAMS}); {fix}")
    missing = [n for n in files if not (root / n).is_file()]
    if missing:
        raise FlaxdoseError(f"the model package {root} is incomplete: {', '.join(missing)} missing; {fix}")
    changed = [n for n, digest in files.items() if sha256_file(root / n) != digest]
    if changed:
        raise FlaxdoseError(f"the model package {root}: {', '.join(changed)} does not match the SHA-256 its "
                            f"{METADATA} records (changed or damaged since export): do not use it; {fix}")
    if metadata.get("package_sha256") != package_hash(metadata):
        raise FlaxdoseError(f"the model package {root}: {METADATA} was changed after export (its package_sha256 "
                            f"does not match its content): do not use it; {fix}")
    return metadata


def read_package(path: str | os.PathLike) -> tuple[ml_collections.ConfigDict, dict, str, dict]:
    """(model config, params, name, training voxel spacing record) of the package at `path` (checked by
    `read_metadata` first): what `flaxdose.inference.Model.load` builds its model of, named by the package's
    metadata and checking every case against that spacing. Raises FlaxdoseError for a package
    `read_metadata` refuses, inputs (`InputSpec`: structures, target distance, CT) or weights that do not fit
    its model, or no recorded spacing."""
    root = package_root(path)
    metadata = read_metadata(root)
    config = config_lib.load_config_json(root / CONFIG)
    spec = UNetSpec.from_config(config.model)
    fix = f"export it again ({EXPORT_COMMAND})"
    try:  # a package from before include_ct reads as one without the CT (InputSpec.from_config's default)
        inputs = InputSpec.from_config(config)
    except FlaxdoseError as e:
        raise FlaxdoseError(f"the model package {root}: {CONFIG}: {e}; {fix}") from None
    described = metadata.get("inputs", {}).get("channels")
    if spec.in_channels != inputs.channels or (described is not None and len(described) != inputs.channels):
        raise FlaxdoseError(f"the model package {root}: its {CONFIG} gives {inputs.channels} input channels "
                            f"({inputs.describe()}) but its model takes {spec.in_channels} (model.in_channels) and its "
                            f"{METADATA} describes {len(described or [])}: its inputs do not fit its model; {fix}")
    template = flatten_params(jax.eval_shape(lambda: init_params(spec, jax.random.key(0))))
    try:
        with np.load(root / PARAMS, allow_pickle=False) as z:
            stored = {name: z[name] for name in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise FlaxdoseError(f"the model package {root}: {PARAMS} cannot be read ({e}); export it again "
                            f"({EXPORT_COMMAND})") from None
    wrong = sorted(n for n in set(template) | set(stored)
                   if n not in stored or n not in template or stored[n].shape != template[n].shape
                   or stored[n].dtype != np.dtype(template[n].dtype))
    if wrong:
        raise FlaxdoseError(f"the model package {root}: {PARAMS} does not fit its model ({len(wrong)} parameters "
                            f"missing or of another shape, e.g. {wrong[0]}); export it again ({EXPORT_COMMAND})")
    log.info("model package %s (%s, flaxdose %s): %s", metadata["name"], root, metadata.get("flaxdose_version"),
             metadata.get("intended_use", "")[:120])
    try:
        spacing = dict(metadata["inputs"]["voxel_spacing_mm"]["trained_on"])
        spacing = {"min": [float(v) for v in spacing["min"]], "max": [float(v) for v in spacing["max"]]}
    except (KeyError, TypeError, ValueError):
        raise FlaxdoseError(f"the model package {root} records no training voxel spacing (inputs.voxel_spacing_mm."
                            f"trained_on), so the spacing of the cases it predicts cannot be checked; export it again "
                            f"({EXPORT_COMMAND})") from None
    return config, unflatten_params(stored), str(metadata["name"]), spacing
