"""One patient plan (`Case`) and a dataset of them (a folder of `.npz` files + `manifest.json`).

Axis order of every saved volume (masks, dose, CT) is **(x, y, z)** in the DICOM patient
coordinate system (LPS): x runs from the patient's right to left, y from anterior to
posterior, z from inferior to superior. `spacing_mm` is the voxel size along (x, y, z) and
`origin_mm` the patient coordinate of the centre of voxel [0, 0, 0]. Masks are stacked
structure-first, shape (S, X, Y, Z), in the order of `structures`. Inside the model the
same volumes are channels-last, (N, X, Y, Z, C).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_file, atomic_folder

# TG-263 names of the prostate set, in the model's input-channel order.
PROSTATE_STRUCTURES = ("PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "Body")
BODY = "Body"  # the external contour: no dose outside it

MANIFEST = "manifest.json"
CASES_DIR = "cases"
DATASET_FORMAT = "flaxdose-dataset"
DATASET_VERSION = 1
_CASE_FORMAT = "flaxdose-case-v1"
log = logging.getLogger("flaxdose")
# np.load parses each array's header with ast.literal_eval, and CPython 3.11's AST constructor keeps
# its recursion depth in state shared by threads: two threads loading cases at once (the training
# feed's prefetch thread and validation) can fail with "SystemError: AST constructor recursion
# depth mismatch" (python/cpython#106905). Case files are read one at a time.
_NPZ_READ = threading.Lock()


def is_target(structure: str) -> bool:
    """Whether a structure is a target: its name starts with "PTV" (PTV, PTV_7000, PTV56, ...)."""
    return structure.upper().startswith("PTV")


def target_names(structures: Sequence[str]) -> tuple[str, ...]:
    """The targets among `structures`, in their order (see `is_target`)."""
    return tuple(s for s in structures if is_target(s))


@dataclasses.dataclass(frozen=True, eq=False)
class Case:
    """One patient plan on one voxel grid; see the module docstring for the axis order.

    spacing_mm: voxel size (x, y, z) in mm; origin_mm: LPS position (mm) of the centre of
    voxel [0, 0, 0]; prescription_gy: the prescription in Gy (0.0: unknown). Arrays are
    converted on construction (masks bool, dose and ct float32) and checked by `validate`,
    which raises FlaxdoseError.
    """

    case_id: str
    structures: tuple[str, ...]
    masks: np.ndarray  # bool (S, X, Y, Z)
    dose: np.ndarray | None  # float32 (X, Y, Z), Gy; None for a plan without dose
    spacing_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    prescription_gy: float = 0.0
    style: str = ""
    ct: np.ndarray | None = None  # float32 (X, Y, Z), HU, optional
    possible_dose_mask: np.ndarray | None = None  # bool (X, Y, Z), optional (OpenKBP)
    meta: Mapping[str, object] = dataclasses.field(default_factory=dict)  # JSON-serializable

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)  # frozen dataclass
        set_("structures", tuple(str(s) for s in self.structures))
        set_("masks", np.asarray(self.masks, dtype=bool))
        set_("spacing_mm", _triple(self.spacing_mm, "spacing_mm", self.case_id))
        set_("origin_mm", _triple(self.origin_mm, "origin_mm", self.case_id))
        set_("prescription_gy", float(self.prescription_gy))
        set_("meta", dict(self.meta))
        if self.dose is not None:
            set_("dose", np.asarray(self.dose, dtype=np.float32))
        if self.ct is not None:
            set_("ct", np.asarray(self.ct, dtype=np.float32))
        if self.possible_dose_mask is not None:
            set_("possible_dose_mask", np.asarray(self.possible_dose_mask, dtype=bool))
        self.validate()

    @property
    def shape(self) -> tuple[int, int, int]:
        """The grid shape (X, Y, Z) in voxels."""
        return tuple(self.masks.shape[1:])

    def mask(self, structure: str) -> np.ndarray:
        """bool (X, Y, Z) mask of `structure` (by name); FlaxdoseError if the case lacks it."""
        try:
            return self.masks[self.structures.index(structure)]
        except ValueError:
            raise FlaxdoseError(
                f"case {self.case_id!r} has no structure {structure!r}; it has {list(self.structures)}"
            ) from None

    @property
    def targets(self) -> tuple[str, ...]:
        """Names of the target structures (see `is_target`)."""
        return target_names(self.structures)

    def dose_region(self) -> np.ndarray | None:
        """bool (X, Y, Z): where a plan can deposit dose, or None when the case does not say.

        The possible-dose mask when the case has one (OpenKBP's rule), else the body.
        Predictions are zero outside it and isodose Dice is computed inside it.
        """
        if self.possible_dose_mask is not None:
            return self.possible_dose_mask
        return self.mask(BODY) if BODY in self.structures else None

    def replace(self, **changes) -> Case:
        """A copy with the given fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise FlaxdoseError unless the case is consistent.

        Checks: case_id non-empty without path separators; masks (S, X, Y, Z) with one
        structure name each, names unique; dose, ct and possible_dose_mask on the masks' grid;
        dose finite; spacing positive; prescription finite and >= 0.
        """
        where = f"case {self.case_id!r}"
        if not self.case_id or "/" in self.case_id or "\\" in self.case_id:
            raise FlaxdoseError(f"{where}: case_id must be a non-empty name without path separators")
        if self.masks.ndim != 4 or self.masks.shape[0] != len(self.structures):
            raise FlaxdoseError(
                f"{where}: masks must have shape (S, X, Y, Z) with S = {len(self.structures)} structures, "
                f"got {self.masks.shape}; stack one mask per structure in `structures` order"
            )
        if len(set(self.structures)) != len(self.structures):
            raise FlaxdoseError(f"{where}: structure names repeat: {list(self.structures)}")
        for name in ("dose", "ct", "possible_dose_mask"):
            volume = getattr(self, name)
            if volume is not None and volume.shape != self.shape:
                raise FlaxdoseError(
                    f"{where}: {name} has shape {volume.shape} but the masks' grid is {self.shape}; "
                    "resample both onto one grid"
                )
        if self.dose is not None and not np.all(np.isfinite(self.dose)):
            raise FlaxdoseError(f"{where}: dose holds NaN or infinite values; fix or drop this case")
        if min(self.spacing_mm) <= 0:
            raise FlaxdoseError(f"{where}: spacing_mm must be positive, got {self.spacing_mm}")
        if self.prescription_gy < 0 or not np.isfinite(self.prescription_gy):
            raise FlaxdoseError(f"{where}: prescription_gy must be >= 0, got {self.prescription_gy}")

    def check_structures(self, expected: Sequence[str]) -> None:
        """Raise unless this case has exactly `expected` structures in that order."""
        if tuple(expected) != self.structures:
            raise FlaxdoseError(
                f"case {self.case_id!r} has structures {list(self.structures)} but the model expects "
                f"{list(expected)} in that order; re-import the data with that structure list"
            )

    # ---------------------------------------------------------------- storage
    def save(self, path: str | os.PathLike) -> Path:
        """Write the case as a compressed, pickle-free `.npz` atomically (temp file + rename); returns `path`.

        Masks are bit-packed on disk; the same case always gives the same bytes.
        """
        path = Path(path)
        arrays = {
            "format": np.array(_CASE_FORMAT),
            "case_id": np.array(self.case_id),
            "structures": np.array(self.structures, dtype=str),
            "masks": np.packbits(self.masks, axis=-1),  # masks are 1 bit per voxel on disk
            "shape": np.array(self.shape, dtype=np.int64),
            "spacing_mm": np.array(self.spacing_mm, dtype=np.float64),
            "origin_mm": np.array(self.origin_mm, dtype=np.float64),
            "prescription_gy": np.array(self.prescription_gy, dtype=np.float64),
            "style": np.array(self.style),
            "meta": np.array(json.dumps(self.meta, sort_keys=True)),
        }
        for name in ("dose", "ct"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        if self.possible_dose_mask is not None:
            arrays["possible_dose_mask"] = np.packbits(self.possible_dose_mask, axis=-1)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, "wb") as f:
            _write_npz(f, arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Case:
        """Read a case written by `save`.

        Raises FlaxdoseError for a missing, damaged or non-flaxdose file, or content that fails
        `validate`.
        """
        path = Path(path)
        try:
            with _NPZ_READ, np.load(path, allow_pickle=False) as z:
                if "format" not in z or str(z["format"]) != _CASE_FORMAT:
                    raise FlaxdoseError(f"{path} is not a flaxdose case file; write cases with Case.save")
                shape = tuple(int(v) for v in z["shape"])
                unpack = lambda a: np.unpackbits(a, axis=-1, count=shape[-1]).astype(bool)
                return cls(
                    case_id=str(z["case_id"]),
                    structures=tuple(str(s) for s in z["structures"]),
                    masks=unpack(z["masks"]),
                    dose=z["dose"] if "dose" in z else None,
                    spacing_mm=tuple(z["spacing_mm"]),
                    origin_mm=tuple(z["origin_mm"]),
                    prescription_gy=float(z["prescription_gy"]),
                    style=str(z["style"]),
                    ct=z["ct"] if "ct" in z else None,
                    possible_dose_mask=unpack(z["possible_dose_mask"]) if "possible_dose_mask" in z else None,
                    meta=json.loads(str(z["meta"])),
                )
        except FlaxdoseError:
            raise
        except FileNotFoundError:
            raise missing_case_file(path) from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            # numpy's own text for a pickle (an object array) invites unsafe loading; flaxdose never writes one
            detail = "it holds pickled objects" if "allow_pickle" in str(e) else str(e)
            raise FlaxdoseError(f"cannot read case file {path} ({detail}); it is damaged or not a flaxdose case "
                                "(flaxdose writes no pickles: never load it with allow_pickle)") from None


def missing_case_file(path: Path) -> FlaxdoseError:
    """The error for a case file its dataset lists but that is gone, with the fixes."""
    return FlaxdoseError(f"case file {path} does not exist, though its dataset lists it; restore the file or write the "
                         "dataset again (built-in data: delete its folder under the run's data/ and it is generated "
                         "again)")


def _what_to_do(root: Path) -> str:
    """How to make a dataset of a folder that is not one: a DICOM export, OpenKBP challenge data, or else."""
    head = [p for _, p in zip(range(2000), root.rglob("*"))]  # a bounded look: exports can be huge
    if any(p.suffix.lower() == ".dcm" for p in head):
        return f"it holds DICOM files: import them first, python -m flaxdose.import_dicom {root} --out DATASET"
    if any(p.name == "dose.csv" or (p.is_dir() and p.name in ("train-pats", "validation-pats", "test-pats"))
           for p in head):
        return f"it holds OpenKBP challenge data: convert it first, python -m flaxdose.convert_openkbp {root} --out DATASET"
    return "write one with flaxdose.data.write_dataset or a flaxdose importer (import_dicom, convert_openkbp)"


def _write_npz(file, arrays: Mapping[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but with fixed member timestamps: the same case gives the same bytes."""
    with zipfile.ZipFile(file, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)


def _triple(values, name: str, case_id: str) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)):
        raise FlaxdoseError(f"case {case_id!r}: {name} must be 3 finite numbers (x, y, z), got {values!r}")
    return out


# ------------------------------------------------------------------ datasets
@dataclasses.dataclass(frozen=True)
class Dataset:
    """A folder of cases (`cases/<case_id>.npz`) and a `manifest.json` naming the splits."""

    root: Path
    manifest: Mapping[str, object]

    @classmethod
    def open(cls, root: str | os.PathLike) -> Dataset:
        """Open a dataset folder; FlaxdoseError when it is missing or has no valid manifest.json."""
        root = Path(root)
        manifest_path = root / MANIFEST
        if not root.is_dir():
            raise FlaxdoseError(f"dataset folder {root} does not exist; check the path (datasets are written by "
                                "python -m flaxdose.synth, flaxdose.import_dicom or flaxdose.convert_openkbp)")
        if not manifest_path.is_file():
            raise FlaxdoseError(f"{root} has no {MANIFEST}, so it is not a flaxdose dataset; {_what_to_do(root)}")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, ValueError) as e:
            raise FlaxdoseError(f"cannot read {manifest_path}: {e}") from None
        if manifest.get("format") != DATASET_FORMAT or not isinstance(manifest.get("splits"), dict):
            raise FlaxdoseError(f"{manifest_path} is not a flaxdose dataset manifest (format/splits missing)")
        return cls(root, manifest)

    @property
    def structures(self) -> tuple[str, ...]:
        """The cases' structure names in mask (channel) order; () if the manifest does not say."""
        return tuple(self.manifest.get("structures", ()))

    @property
    def splits(self) -> dict[str, list[str]]:
        """Split name -> case ids (a copy of the manifest's)."""
        return {k: list(v) for k, v in self.manifest["splits"].items()}

    def split(self, name: str) -> list[str]:
        """The case ids of split `name`; FlaxdoseError if the dataset has no such split."""
        splits = self.splits
        if name not in splits:
            raise FlaxdoseError(f"dataset {self.root} has no split {name!r}; it has {sorted(splits)}")
        return splits[name]

    def case_path(self, case_id: str) -> Path:
        """Where case `case_id` is stored (``<root>/cases/<case_id>.npz``); not checked to exist."""
        return self.root / CASES_DIR / f"{case_id}.npz"

    def load(self, case_id: str) -> Case:
        """Load one case (`Case.load`); FlaxdoseError if it is missing or damaged."""
        return Case.load(self.case_path(case_id))

    def case_shape(self, case_id: str) -> tuple[int, int, int]:
        """A case's grid (X, Y, Z) voxels, read without loading its volumes; FlaxdoseError if unreadable."""
        return tuple(int(v) for v in self._read_field(case_id, "shape"))

    def case_spacing_mm(self, case_id: str) -> tuple[float, float, float]:
        """A case's voxel size (x, y, z) in mm, read without loading its volumes; FlaxdoseError if unreadable."""
        return tuple(float(v) for v in self._read_field(case_id, "spacing_mm"))

    def has_ct(self, case_id: str) -> bool:
        """Whether case `case_id` stores a CT, read without loading its volumes; FlaxdoseError if unreadable."""
        return self._read(case_id, lambda z: "ct" in z.files)

    def _read_field(self, case_id: str, name: str) -> np.ndarray:
        return self._read(case_id, lambda z: z[name])

    def _read(self, case_id: str, fn: Callable) -> object:
        path = self.case_path(case_id)
        try:
            with _NPZ_READ, np.load(path, allow_pickle=False) as z:
                return fn(z)
        except FileNotFoundError:
            raise missing_case_file(path) from None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as e:
            raise FlaxdoseError(f"cannot read case file {path} ({e}); it is damaged or not a flaxdose case") from None


def write_dataset(
    root: str | os.PathLike,
    cases: Iterable[Case],
    splits: Mapping[str, Sequence[str]],
    *,
    overwrite: bool = False,
    extra: Mapping[str, object] | None = None,
) -> Dataset:
    """Write cases and a manifest into a temporary folder, then rename it to `root`.

    Nothing half-written is ever left at `root`: an interrupted write leaves only a hidden
    temporary folder next to it. An existing non-empty `root` is refused unless `overwrite`.
    Raises FlaxdoseError for that, for cases whose structures differ from the first case's,
    repeated case ids, or splits naming cases that were not written. Returns the opened `Dataset`.
    """
    with atomic_folder(root, overwrite, "dataset") as tmp:
        ids, structures = [], None
        for case in cases:
            structures = structures or case.structures
            case.check_structures(structures)
            case.save(tmp / CASES_DIR / f"{case.case_id}.npz")
            ids.append(case.case_id)
        if len(set(ids)) != len(ids):
            raise FlaxdoseError("case ids repeat within the dataset; give every case a unique case_id")
        unknown = sorted({i for ids_ in splits.values() for i in ids_} - set(ids))
        if unknown:
            raise FlaxdoseError(f"splits name cases that were not written: {unknown[:5]}")
        manifest = {
            "format": DATASET_FORMAT,
            "version": DATASET_VERSION,
            "axis_order": "x (right->left), y (anterior->posterior), z (inferior->superior); masks (S, X, Y, Z)",
            "structures": list(structures or ()),
            "num_cases": len(ids),
            "splits": {k: list(v) for k, v in splits.items()},
            **dict(extra or {}),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return Dataset.open(root)


ALL_SPLITS = "all"  # --split all: every case of every split (an import with --test_fraction 0 has only "train")


def with_all_split(dataset: Dataset, split: str) -> Dataset:
    """`dataset` itself, or for `split` "all" (`ALL_SPLITS`) when the dataset has no split of that name, a
    copy whose manifest (in memory only; nothing is written) adds "all": every case of every split, each
    once, in split order."""
    if split != ALL_SPLITS or ALL_SPLITS in dataset.splits:
        return dataset
    every = list(dict.fromkeys(i for ids in dataset.splits.values() for i in ids))
    manifest = {**dataset.manifest, "splits": {**dataset.splits, ALL_SPLITS: every}}
    return Dataset(dataset.root, manifest)


# ---------------------------------------------------------------- keep going over cases
def failure_list(failed: Mapping[str, str], limit: int = 5, noun: str = "case", reasons: int | None = None) -> str:
    """``cases a, b: reason; case c: reason (and 3 more)``: {case id: reason}, cases with the same reason
    together (each reason once), the first `limit` case ids of each. A reason that names its case is the
    same reason for another case; such a group shows the first case's reason as it was given, then the
    others: ``case a: case 'a' has spacing 4x4x3 mm; likewise case b``. `noun` names the items (e.g. "plan");
    `reasons`: show at most that many reasons, then how many more there are."""
    by_reason: dict[str, list[str]] = {}
    for case_id, reason in failed.items():
        by_reason.setdefault(str(reason).replace(repr(case_id), "\0"), []).append(case_id)
    items = []
    for template, ids in by_reason.items():
        if "\0" not in template or len(ids) == 1:  # the reason as given (it names its one case, if any)
            more = f" and {len(ids) - limit} more" if len(ids) > limit else ""
            items.append(f"{noun}{'s' if len(ids) > 1 else ''} {', '.join(ids[:limit])}{more}: {failed[ids[0]]}")
            continue
        others = ids[1:]
        more = f" and {len(others) - (limit - 1)} more" if len(others) > limit - 1 else ""
        items.append(f"{noun} {ids[0]}: {failed[ids[0]]}; likewise {noun}{'s' if len(others) > 1 else ''} "
                     f"{', '.join(others[:limit - 1])}{more}")
    if reasons is not None and len(items) > reasons:
        items = [*items[:reasons], f"and {len(items) - reasons} more reason(s)"]
    return "; ".join(items)


def each_case(case_ids: Sequence[str], fn: Callable[[str], object], *, action: str, what: str
              ) -> tuple[dict[str, object], dict[str, str]]:
    """Run ``fn(case_id)`` for every case, keeping going over cases that fail.

    A case whose `fn` raises FlaxdoseError is logged ("case X not <action>: why") and left out.
    Returns ({case id: result} in order, {case id: reason}). Raises FlaxdoseError naming every
    reason (`failure_list`) when no case succeeded; `what` names the cases ("split 'test' of D").
    """
    results, failed = {}, {}
    for case_id in tqdm(case_ids, desc=f"cases {action}", unit="case"):
        try:
            results[case_id] = fn(case_id)
        except FlaxdoseError as e:
            log.warning("case %s not %s: %s", case_id, action, e)
            failed[case_id] = str(e)
    if not results:
        raise FlaxdoseError(f"no case of {what} could be {action}: " + failure_list(failed))
    return results, failed


