"""Import every plan of a folder of DICOM-RT exports into a flaxdose dataset, with a report to check.

A plan that cannot be read is listed (console only: messages name files) and skipped; the
others are imported. The dataset folder appears complete or not at all: cases are staged in
a hidden folder and the dataset (cases, manifest.json, import_report.csv) is renamed into
place at the end; the staging of an import killed outright (`kill -9`) is removed by the next
import to the same folder (`flaxdose.io.remove_stale_staging`). All plans of one patient land
in one split (see `patient_splits`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import secrets
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from flaxdose.data.case import PROSTATE_STRUCTURES, Case, failure_list, write_dataset
from flaxdose.dicom.archives import Unpacker
from flaxdose.dicom.damage import damaged_among, plan_damage
from flaxdose.dicom.dose import NotExternalPhotonPlan
from flaxdose.dicom.files import Grouping, PlanFiles, ScanResult, group_plans, scan_tree
from flaxdose.dicom.readers import ReadOptions, plan_case_id, read_plan
from flaxdose.errors import FlaxdoseError
from flaxdose.io import atomic_folder, atomic_write_text, check_writable, staging_folder

REPORT_CSV = "import_report.csv"
STRUCTURE_COLUMNS = ("roi", "contours", "planes", "planes_used", "voxels", "cc", "contoured_cc", "coverage")
REPORT_COLUMNS = ("case_id", "split", "structure", *STRUCTURE_COLUMNS, "dose_source", "dose_type", "dose_max_gy",
                  "prescription_gy", "prescription_source", "grid", "grid_shape", "grid_spacing_mm")


def report_rows(case: Case, split: str) -> list[dict]:
    """The import report of one case: one row per structure (REPORT_COLUMNS; no patient data)."""
    meta = case.meta
    geometry = meta.get("grid_geometry") or {}
    common = {
        "case_id": case.case_id, "split": split, "dose_source": meta.get("dose_source", ""),
        "dose_type": meta.get("dose_type", ""), "dose_max_gy": meta.get("dose_max_gy"),
        "prescription_gy": case.prescription_gy, "prescription_source": meta.get("prescription_source", ""),
        "grid": meta.get("grid", ""), "grid_shape": "x".join(str(v) for v in geometry.get("shape", ())),
        "grid_spacing_mm": "x".join(f"{v:g}" for v in geometry.get("spacing_mm", ())),
    }
    facts: Mapping[str, Mapping] = meta.get("structures", {})
    return [{**common, "structure": s, **{k: facts.get(s, {}).get(k) for k in STRUCTURE_COLUMNS}}
            for s in case.structures]


def _csv(rows: Sequence[dict]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


@dataclasses.dataclass
class ImportSummary:
    """What an import did. `failures`, `damaged_files` and `set_aside` name files: console only."""

    dataset: Path
    case_ids: list[str]
    failures: list[tuple[str, str]]  # (where, why)
    damaged_files: list[tuple[str, str]]  # (path, why)
    num_patients: int
    rows: list[dict] = dataclasses.field(default_factory=list)  # the import report (REPORT_COLUMNS)
    warnings: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # case id -> coverage warnings
    notes: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # case id -> doses/contours set aside
    copies: int = 0  # identical copies of instances set aside
    set_aside: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why): DICOMDIR, ...
    refused_beside: list[str] = dataclasses.field(default_factory=list)  # damaged files beside a refused plan
    left_out: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (where, why): brachy, ion plans
    not_read: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (path, why): not DICOM, hidden
    unpacked: list[tuple[str, int]] = dataclasses.field(default_factory=list)  # (archive, files in it)

    def table(self) -> str:
        """Per plan: dose, prescription, grid, and per structure its ROI, contours, planes, cc, coverage."""
        lines = []
        for case_id in self.case_ids:
            rows = [r for r in self.rows if r["case_id"] == case_id]
            if not rows:
                continue
            r = rows[0]
            lines.append(
                f"{case_id} [{r['split']}]: dose {r['dose_source']} {r['dose_type']} (max {r['dose_max_gy']} Gy), "
                f"prescription {r['prescription_gy']:.2f} Gy ({r['prescription_source']}), "
                f"grid {r['grid']} {r['grid_shape']} x {r['grid_spacing_mm']} mm"
            )
            lines.append(f"    {'structure':<14}{'ROI':<20}{'contours':>9}{'planes':>10}{'cc':>10}{'coverage':>10}")
            for s in rows:
                lines.append(
                    f"    {s['structure']:<14}{str(s['roi'])[:19]:<20}{s['contours']:>9}"
                    f"{str(s['planes_used']) + '/' + str(s['planes']):>10}{s['cc']:>10.1f}{100 * s['coverage']:>9.1f}%"
                )
            lines += [f"    ! {w}" for w in self.warnings.get(case_id, [])]
            lines += [f"    note: {n}" for n in self.notes.get(case_id, [])]
        return "\n".join(lines)

    def report(self) -> str:
        """The table, then the counts and every failure (what a physicist checks after an import)."""
        lines = [self.table()] if self.rows else []
        lines.append(f"imported {len(self.case_ids)} plan(s) from {self.num_patients} patient(s) into {self.dataset}"
                     f" (report: {REPORT_CSV})")
        if self.copies:
            lines.append(f"{self.copies} identical copy(ies) of DICOM instances counted once")
        if self.unpacked:
            shown = ", ".join(f"{Path(a).name} ({n} files)" for a, n in self.unpacked[:10])
            more = " ..." if len(self.unpacked) > 10 else ""
            lines.append(f"{len(self.unpacked)} archive(s) unpacked and read: {shown}{more}")
        lines += _grouped(self.set_aside, "file(s) set aside")
        lines += _grouped(self.not_read, "file(s) not read")
        if self.left_out:
            lines.append(f"{len(self.left_out)} plan(s) left out (flaxdose models external photon treatment plans "
                         "with their dose):")
            lines += [f"  - {where}: {why}" for where, why in self.left_out]
        if self.failures:
            lines.append(f"{len(self.failures)} patient(s)/plan(s) FAILED and were skipped:")
            lines += [f"  - {where}: {why}" for where, why in self.failures]
        beside = [why for path, why in self.damaged_files if path in self.refused_beside]
        apart = [why for path, why in self.damaged_files if path not in self.refused_beside]
        if beside:
            lines.append(f"{len(beside)} damaged DICOM file(s) found: the plans beside them were refused "
                         "(listed above):")
            lines += [f"  - {why}" for why in beside[:20]]
        if apart:
            lines.append(f"{len(apart)} damaged DICOM file(s) in folders without a plan, ignored:")
            lines += [f"  - {why}" for why in apart[:20]]
        return "\n".join(lines)


def _grouped(items: Sequence[tuple[str, str]], what: str, shown: int = 10) -> list[str]:
    """One line per reason: "N <what>: <reason>: name, name, ..." (every reason, the first names of each)."""
    by_why: dict[str, list[str]] = defaultdict(list)
    for path, why in items:
        by_why[why].append(Path(path).name)
    return [f"{len(names)} {what}: {why}: {', '.join(names[:shown])}" + (" ..." if len(names) > shown else "")
            for why, names in by_why.items()]


def patient_splits(case_keys: Mapping[str, Sequence[str]], test_fraction: float, seed: int) -> dict[str, list[str]]:
    """Train/test split of case ids that never separates cases of one patient.

    case_keys: case id -> identifiers of its patient (PatientID, StudyInstanceUID,
    FrameOfReferenceUID; empty ones ignored); cases sharing any identifier form one group,
    so a patient exported twice under two PatientIDs still stays together. Groups are
    shuffled (numpy Generator of `seed`) and go to "test" until it holds
    round(test_fraction x cases) cases.
    """
    parent = {cid: cid for cid in case_keys}

    def root(node):
        while parent[node] != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    owner: dict[str, str] = {}
    for cid, keys in case_keys.items():
        for key in (k for k in keys if k):
            parent[root(cid)] = root(owner.setdefault(key, cid))
    by_group: dict[str, list[str]] = defaultdict(list)
    for cid in case_keys:
        by_group[root(cid)].append(cid)
    groups = sorted(sorted(ids) for ids in by_group.values())  # an order that names no patient
    n_test = int(round(test_fraction * len(case_keys)))
    test: list[str] = []
    for i in np.random.default_rng(seed).permutation(len(groups)):
        if len(test) >= n_test:
            break
        test += groups[i]
    splits = {"train": sorted(set(case_keys) - set(test))}
    if test:
        splits["test"] = sorted(test)
    return splits


def check_out_apart(src: str | os.PathLike | Iterable[str | os.PathLike], out: str | os.PathLike) -> None:
    """Refuse a dataset folder `out` that is a source folder, lies inside one, or holds one.

    A dataset inside its source would be read by the next import of that source (its staging
    files by this one); a dataset folder holding the source would replace it. Symbolic links
    are resolved. Raises FlaxdoseError naming both paths and the fix.
    """
    sources = [src] if isinstance(src, (str, os.PathLike)) else list(src)
    target = Path(out).expanduser().resolve()
    for source in sources:
        where = Path(source).expanduser().resolve()
        if not where.is_file() and (target == where or where in target.parents):
            what = "is the source folder" if target == where else "lies inside the source folder"
            raise FlaxdoseError(f"the dataset folder (--out) {out} {what} {source}: a later import of {source} "
                                f"would read the dataset it wrote; choose a dataset folder outside {source}")
        if target in where.parents:
            raise FlaxdoseError(f"the dataset folder (--out) {out} holds the source {source}: writing the dataset "
                                f"would replace it; choose a dataset folder outside {source}")


def import_dicom(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    structures: Sequence[str] | None = None,
    grid: str | None = None,
    *,
    options: ReadOptions | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    require_dose: bool = True,
    **fields,
) -> ImportSummary:
    """Import every plan under `src` into a dataset at `out`, with `import_report.csv` beside the manifest.

    `options` say how every plan is read (`ReadOptions`); without them, `structures` (default the
    prostate structures), `grid` (default "model") and `fields` (the other `ReadOptions` fields:
    ``aliases``, ``keep_ids``, ``salt``, ``min_coverage``, ...) make them. A plan whose files cannot
    be read, or that `read_plan` refuses, is reported in the summary and skipped (a failure); so is a
    plan without RTDOSE unless `require_dose=False`, and an archive that cannot be unpacked (zip, tar
    and .gz/.bz2/.xz files are unpacked and read); brachytherapy and ion plans are left out (listed);
    files not read are listed. Case ids are salted hashes (the salt is random unless given) unless
    ``keep_ids``. All plans of one patient go to one split. Raises FlaxdoseError when no plan could be
    imported, and when `out` is, lies inside or holds a source folder (`check_out_apart`); nothing is
    written then.
    """
    if options is None:  # an import's defaults: the prostate structures on the model grid
        structures = PROSTATE_STRUCTURES if structures is None else structures
        grid = "model" if grid is None else grid
    given = {name: v for name, v in (("structures", structures), ("grid", grid)) if v is not None}
    options = ReadOptions.given(options, **given, **fields)
    if not 0.0 <= test_fraction < 1.0:
        raise FlaxdoseError(f"test_fraction must be in [0, 1), got {test_fraction}")
    src = src if isinstance(src, (str, os.PathLike)) else list(src)  # read twice: checked, then scanned
    check_out_apart(src, out)
    check_writable(out, overwrite, "dataset")  # before the long work
    with Unpacker() as unpacker:  # archives' files are read until the import ends
        scanned = scan_tree(src, progress, unpacker)
        return _import_plans(scanned, src, out, options, test_fraction=test_fraction, seed=seed, overwrite=overwrite,
                             progress=progress, require_dose=require_dose)


def _plans_to_read(scanned: ScanResult, found: Grouping) -> tuple[list, list[tuple[str, str]], set[str]]:
    """(the plans to read as (index, count, plan) of each patient, failures, damaged files beside them).

    A folder that could not be read, and a patient whose files form no plan, are failures (naming
    the patient's damaged files when it has any: a cut RTSTRUCT, not "no RTSTRUCT", is why).
    """
    files, damaged = scanned.files, scanned.damaged
    failures: list[tuple[str, str]] = [
        (path, f"{why}; a patient may be inside") for path, why in scanned.unreadable]  # exit 1: maybe missing
    refused_beside: set[str] = set()  # damaged files in the folders of a refused plan (or patient)
    todo = []
    for pid, plans in found.patients.items():
        if isinstance(plans, str):
            mine = [f for f in files if f.patient_id == pid]
            damage = plan_damage(damaged, mine)  # e.g. a cut RTSTRUCT: the damage, not "no RTSTRUCT", is why
            failures.append((str(mine[0].path.parent) if mine else "?",
                             f"{damage}; without them: {plans}" if damage else plans))
            refused_beside.update(p for p, _ in damaged_among(damaged, mine))
            continue
        todo += [(i, len(plans), p) for i, p in enumerate(plans)]
    return todo, failures, refused_beside


def _read_one(plan: PlanFiles, index: int, count: int, damaged, options: ReadOptions, salt: str, require_dose: bool,
              taken: Mapping[str, object]) -> Case:
    """Plan `index` of the `count` plans of one patient read as a case with its import case id (not in `taken`).

    Raises FlaxdoseError for a plan without dose (`require_dose`), with damaged files in its
    folders, whose case id repeats, or that `read_plan` refuses.
    """
    if require_dose and not plan.doses:
        raise FlaxdoseError("no RTDOSE found for this plan; export the plan dose with it")
    damage = plan_damage(damaged, plan.files)  # the damaged files in the plan's folders
    if damage:
        raise FlaxdoseError(damage)
    cid = plan_case_id(plan, options.keep_ids, salt)
    if count > 1:
        cid = f"{cid}_{index + 1}"
    if cid in taken:
        raise FlaxdoseError(f"case id {cid} repeats (two patients share an ID); import them separately")
    return read_plan(plan, options, cid)


def _write_import(out: Path, staged: Mapping[str, tuple[Path, tuple[str, ...]]], scanned: ScanResult,
                  found: Grouping, num_failed: int, options: ReadOptions, test_fraction: float, seed: int,
                  overwrite: bool) -> tuple[list[str], list[dict]]:
    """The dataset at `out` (the staged cases in their splits, the manifest, the import report), written
    atomically; (its case ids, the report's rows)."""
    splits = patient_splits({cid: keys for cid, (_, keys) in staged.items()}, test_fraction, seed)
    split_of = {cid: name for name, ids in splits.items() for cid in ids}
    ids = sorted(staged)
    rows = [row for cid in ids for row in report_rows(Case.load(staged[cid][0]), split_of[cid])]
    extra = {
        "source": "dicom",
        "grid": options.grid,
        "deidentified": not options.keep_ids,
        "import": {"num_patients": len(found.patients), "num_plans": len(ids), "num_failed": num_failed,
                   "copies_counted_once": len(found.copies), "files_set_aside": len(found.ignored),
                   "archives_unpacked": len(scanned.unpacked), "files_not_read": len(scanned.not_read),
                   "min_coverage": options.min_coverage, "report": REPORT_CSV},
    }
    with atomic_folder(out, overwrite, "dataset") as folder:
        write_dataset(folder, (Case.load(staged[c][0]) for c in ids), splits, overwrite=True, extra=extra)
        atomic_write_text(folder / REPORT_CSV, _csv(rows))
    return ids, rows


def _import_plans(scanned: ScanResult, src, out, options: ReadOptions, *, test_fraction: float, seed: int,
                  overwrite: bool, progress: bool, require_dose: bool) -> ImportSummary:
    """`import_dicom` once the source is scanned: each plan read, staged, then the dataset written."""
    damaged = scanned.damaged
    found = group_plans(scanned.files)
    salt = options.salt if options.salt is not None else secrets.token_hex(16)
    todo, failures, refused_beside = _plans_to_read(scanned, found)
    left_out: list[tuple[str, str]] = [(str(path), why) for path, why in found.unused]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staged: dict[str, tuple[Path, tuple[str, ...]]] = {}  # case id -> (staged file, patient identifiers)
    warnings: dict[str, list[str]] = {}
    notes: dict[str, list[str]] = {}
    with staging_folder(out) as stage:
        for index, count, plan in tqdm(todo, desc="importing", unit="plan", file=sys.stderr, disable=not progress):
            try:
                case = _read_one(plan, index, count, damaged, options, salt, require_dose, staged)
                cid = case.case_id
                keys = tuple(f"{kind}:{uid}" if uid else "" for kind, uid in
                             (("patient", plan.patient_id), ("study", plan.study_uid), ("frame", plan.for_uid)))
                staged[cid] = (case.save(Path(stage) / f"{cid}.npz"), keys)
                warnings[cid], notes[cid] = list(case.meta["warnings"]), list(case.meta["notes"])
            except NotExternalPhotonPlan as e:
                left_out.append((plan.label, str(e)))
            except FlaxdoseError as e:
                failures.append((plan.label, str(e)))
                refused_beside.update(p for p, _ in damaged_among(damaged, plan.files))
            except Exception as e:  # noqa: BLE001 - one bad patient must not stop the import
                failures.append((plan.label, f"unexpected {type(e).__name__}: {e} (please report this)"))
                refused_beside.update(p for p, _ in damaged_among(damaged, plan.files))
        if not staged:
            raise FlaxdoseError(
                "no plan could be imported from "
                f"{src}: " + (failure_list(dict(failures + left_out), limit=3, noun="plan", reasons=5) or "no DICOM-RT files found")
                + (f" ({len(damaged)} damaged file(s): {damaged[0][1]})" if damaged and not failures else "")
            )
        ids, rows = _write_import(out, staged, scanned, found, len(failures), options, test_fraction, seed, overwrite)
    return ImportSummary(out, ids, failures, damaged, len(found.patients), rows, warnings, notes, len(found.copies),
                         [(str(p), why) for p, why in found.ignored], sorted(refused_beside), left_out,
                         scanned.not_read, scanned.unpacked)
