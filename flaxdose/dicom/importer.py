"""Import every plan of a folder of DICOM-RT exports into a flaxdose dataset."""

from __future__ import annotations

import dataclasses
import os
import secrets
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from flaxdose.data.case import PROSTATE_STRUCTURES, Case, write_dataset
from flaxdose.dicom.files import group_plans, scan
from flaxdose.dicom.readers import plan_case_id, read_plan
from flaxdose.dicom.structures import AliasTable
from flaxdose.errors import FlaxdoseError


@dataclasses.dataclass
class ImportSummary:
    """What an import did: the dataset, the imported case ids, the plans that failed and why."""

    dataset: Path
    case_ids: list[str]
    failures: list[tuple[str, str]]  # (where, why): console only, never written to the dataset
    damaged_files: list[tuple[str, str]]
    num_patients: int

    def report(self) -> str:
        lines = [
            f"imported {len(self.case_ids)} plan(s) from {self.num_patients} patient(s) into {self.dataset}",
        ]
        if self.failures:
            lines.append(f"{len(self.failures)} patient(s)/plan(s) FAILED and were skipped:")
            lines += [f"  - {where}: {why}" for where, why in self.failures]
        if self.damaged_files:
            lines.append(f"{len(self.damaged_files)} damaged DICOM file(s) ignored:")
            lines += [f"  - {why}" for _, why in self.damaged_files[:20]]
        return "\n".join(lines)


def import_dicom(
    src: str | os.PathLike | Iterable[str | os.PathLike],
    out: str | os.PathLike,
    structures: Sequence[str] = PROSTATE_STRUCTURES,
    grid: str = "model",
    *,
    aliases: AliasTable | None = None,
    keep_ids: bool = False,
    salt: str | None = None,
    test_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    require_dose: bool = True,
    **read_kwargs,
) -> ImportSummary:
    """Import every plan under `src` into a dataset at `out` (see `flaxdose.dicom.readers`).

    A patient whose files cannot be read is reported in the summary and skipped; so is a
    plan without RTDOSE unless `require_dose=False`. Case ids are salted hashes (the salt
    is random unless given) unless `keep_ids`. `read_kwargs` go to `read_plan`.
    """
    if not 0.0 <= test_fraction < 1.0:
        raise FlaxdoseError(f"test_fraction must be in [0, 1), got {test_fraction}")
    files, damaged = scan(src, progress=progress)
    found = group_plans(files)
    salt = salt if salt is not None else secrets.token_hex(16)
    failures: list[tuple[str, str]] = []
    staged: list[tuple[str, Path]] = []
    todo = []
    for pid, plans in found.items():
        if isinstance(plans, str):
            where = next((str(f.path.parent) for f in files if f.patient_id == pid), "?")
            failures.append((where, plans))
            continue
        todo += [(i, len(plans), p) for i, p in enumerate(plans)]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.staging.") as stage:
        iterator = todo
        if progress:
            from tqdm import tqdm

            iterator = tqdm(todo, desc="importing", unit="plan", file=sys.stderr)
        for index, count, plan in iterator:
            try:
                if require_dose and plan.dose is None:
                    raise FlaxdoseError("no RTDOSE found for this plan; export the plan dose with it")
                cid = plan_case_id(plan, keep_ids, salt)
                if count > 1:
                    cid = f"{cid}_{index + 1}"
                case = read_plan(plan, structures, grid, aliases=aliases, case_id=cid, keep_ids=keep_ids, **read_kwargs)
                if any(cid == c for c, _ in staged):
                    raise FlaxdoseError(f"case id {cid} repeats (two patients share an ID); import them separately")
                path = case.save(Path(stage) / f"{cid}.npz")
                staged.append((cid, path))
            except FlaxdoseError as e:
                failures.append((plan.label, str(e)))
            except Exception as e:  # noqa: BLE001 - one bad patient must not stop the import
                failures.append((plan.label, f"unexpected {type(e).__name__}: {e} (please report this)"))
        if not staged:
            raise FlaxdoseError(
                "no plan could be imported from "
                f"{src}: " + ("; ".join(f"{w}: {m}" for w, m in failures[:5]) or "no DICOM-RT files found")
            )
        ids = sorted(c for c, _ in staged)
        rng = np.random.default_rng(seed)
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        n_test = int(round(test_fraction * len(ids)))
        splits = {"train": sorted(shuffled[n_test:])}
        if n_test:
            splits["test"] = sorted(shuffled[:n_test])
        extra = {
            "source": "dicom",
            "grid": grid,
            "deidentified": not keep_ids,
            "import": {"num_patients": len(found), "num_plans": len(ids), "num_failed": len(failures)},
        }
        write_dataset(out, (Case.load(p) for _, p in sorted(staged)), splits, overwrite=overwrite, extra=extra)
    return ImportSummary(out, ids, failures, damaged, len(found))
