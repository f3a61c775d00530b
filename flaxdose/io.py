"""Writing folders and files so that nothing half-written is ever left behind.

Every writer stages its output beside the target under a hidden name that names its owner,
`.NAME.staging.HOST.PID.RANDOM`, and renames it into place on success. A writer killed
outright (`kill -9`, a power cut) cannot clean up, so each writer first removes the stale
staging of its own target: names of exactly that pattern whose owner ran on this host and
is no longer alive. A live writer's staging, another host's, and any other name are kept.

Replacing a folder (`atomic_folder(..., overwrite=True)`) swaps through renames: the old folder
is renamed to `.NAME.previous.HOST.PID.RANDOM`, the new one into place, then the old one is
removed. At every moment one complete copy exists under one of those names: interrupted
between the renames (Ctrl-C, an exception) the old folder is renamed back; killed there
(`kill -9`), the next writer of the same target renames a dead writer's previous copy back when
the target is missing (and removes it when the target is there).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flaxdose.errors import FlaxdoseError

log = logging.getLogger("flaxdose")


def require_folder(path: str | os.PathLike, what: str = "the workdir",
                   fix: str = "(a new one, or the one to resume)") -> Path:
    """`path` as a Path, refused (FlaxdoseError) when it exists as a file: a run or study folder resumes
    into an existing folder, so only a file in the way is an error, and it is named as one (`what`: the
    flag or role it was given as, "" for none; `fix`: which folder to give instead)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FlaxdoseError(f"{f'{what} ' if what else ''}{path} is a file, not a folder; give a folder path {fix}")
    return path


# What --overwrite may replace: an earlier output of the same kind, recognised by the files the writer always
# writes (all of `needs`, none of `not_with`), or an empty folder; never a folder of anyone else's files.
OUTPUT_KINDS: dict[str, dict] = {
    # flaxdose.data.write_dataset (synth, import_dicom, convert_openkbp, predict --data): data.case.MANIFEST
    "dataset": {"what": "flaxdose dataset", "needs": ("manifest.json",), "not_with": ()},
    # export_model: run.PACKAGE_METADATA
    "model package": {"what": "model package", "needs": ("flaxdose_model.json",), "not_with": ()},
    # evaluate (and evaluate --openkbp); a QA report has these two as well, and its calibration.json
    "evaluation": {"what": "evaluation report", "needs": ("summary.json", "report.md"),
                   "not_with": ("calibration.json", "assessment.json", "manifest.json")},
    # qa (the report, or --calibration_data alone: the calibration)
    "qa": {"what": "plan-QA report or calibration", "needs": ("calibration.json",), "not_with": ("manifest.json",)},
    # assess_style
    "assessment": {"what": "style assessment", "needs": ("assessment.json",), "not_with": ()},
    # predict --dicom ROOT: inference.dicom_plans.SUMMARY_CSV
    "dicom predictions": {"what": "DICOM prediction folder", "needs": ("summary.csv",),
                          "not_with": ("manifest.json", "summary.json")},
}


def is_output(folder: str | os.PathLike, kind: str) -> bool:
    """Whether the folder `folder` is an earlier flaxdose output of `kind` (a key of `OUTPUT_KINDS`)."""
    folder, spec = Path(folder), OUTPUT_KINDS[kind]
    return (all((folder / n).is_file() for n in spec["needs"])
            and not any((folder / n).exists() for n in spec["not_with"]))


def output_kind(folder: str | os.PathLike) -> str | None:
    """The kind of flaxdose output (`OUTPUT_KINDS`) the folder `folder` is; None when it is none of them."""
    return next((kind for kind in OUTPUT_KINDS if is_output(folder, kind)), None)


def check_writable(root: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> None:
    """Refuse to replace a non-empty folder unless asked to, and then only an earlier output; call before long work.

    `kind` (a key of `OUTPUT_KINDS`): what the caller writes. Raises FlaxdoseError when `root` is a file;
    when it is a non-empty folder and not `overwrite`; and, with `overwrite`, when it is, holds or lies
    inside a training workdir (config.json + checkpoints/), or (given `kind`) when it is a non-empty
    folder that is not an earlier output of that kind: --overwrite replaces earlier outputs of the same
    command, never a trained model, the data inside its workdir, nor files flaxdose did not write there.
    `kind` None (library use of `atomic_folder`) leaves that last check to the caller.
    """
    if kind is not None and kind not in OUTPUT_KINDS:
        raise ValueError(f"unknown output kind {kind!r}; one of {sorted(OUTPUT_KINDS)}")
    root = require_folder(root, "", "for the output")
    real = root.resolve()  # "a/run/.." is a, which holds the run a/run
    run = _training_run_at_or_around(real) if overwrite and root.exists() else None
    if run is not None:  # --overwrite never deletes a trained model (nor data or outputs inside its workdir)
        relation = "is" if run == real else "holds" if real in run.parents else "lies inside"
        raise FlaxdoseError(f"{real} {relation} the training run {run}; choose an output folder outside every "
                            "training workdir")
    names = sorted(p.name for p in root.iterdir()) if root.exists() else []
    if names and not overwrite:
        raise FlaxdoseError(f"{root} already holds files; choose an empty folder or pass --overwrite")
    if names and kind is not None and not is_output(root, kind):
        spec, found = OUTPUT_KINDS[kind], output_kind(root)
        shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        other = OUTPUT_KINDS[found]["what"] if found else ""
        what = (f"is {'an' if other[:1] in 'aeiou' else 'a'} {other}, not an earlier {spec['what']}; --overwrite "
                "would delete it"
                if found else f"is not an earlier {spec['what']} (it has no {' + '.join(spec['needs'])}); "
                "--overwrite would delete files that are not this command's")
        raise FlaxdoseError(f"{root} {what} ({shown}). --overwrite replaces only an earlier output of the same "
                            "command or an empty folder: choose another --out, or empty the folder yourself")


def _is_training_run(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "checkpoints").is_dir()


def _training_run_at_or_around(root: Path, depth: int = 3) -> Path | None:
    """A training workdir (config.json + checkpoints/) that `root` is, lies inside, or holds within `depth`
    levels; None when there is none."""
    root = root.resolve()
    for folder in (root, *root.parents):
        if _is_training_run(folder):
            return folder
    level = [root] if root.is_dir() else []
    for _ in range(depth):
        level = [c for f in level for c in f.iterdir() if c.is_dir() and not c.is_symlink()]
        run = next((c for c in level if _is_training_run(c)), None)
        if run is not None:
            return run
    return None


def _host() -> str:
    """This host's name in the characters a staging name allows (dots would split the pattern)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "host"


def _owner_alive(pid: int) -> bool:
    """Whether process `pid` of this host runs; True whenever that cannot be told (be conservative)."""
    if pid == os.getpid():
        return True
    if os.name == "nt" or pid <= 0:  # os.kill(pid, 0) would terminate on Windows; pid 0/-1 mean groups
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def _stale_staging(target: Path) -> list[Path]:
    """Remove the staging of `target` left by dead writers of this host (and, inside, theirs); the removed."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.staging\.{re.escape(_host())}\.(\d+)\.[0-9a-f]{{8}}")
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:  # no parent yet: nothing to clean
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _owner_alive(int(match.group(1))):
            continue
        path = target.parent / name
        removed += _stale_staging(path)  # a dead writer's nested staging (a writer inside its folder)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _previous_name(target: Path) -> Path:
    """Where `atomic_folder` parks the folder it replaces: `.NAME.previous.HOST.PID.RANDOM` beside it."""
    return target.parent / f".{target.name}.previous.{_host()}.{os.getpid()}.{secrets.token_hex(4)}"


def _restore_previous(target: Path) -> list[Path]:
    """A dead writer's parked previous copy of `target`: renamed back when `target` is missing (a swap
    killed between its two renames), removed when `target` exists (killed after them). The paths handled."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.previous\.{re.escape(_host())}\.(\d+)\.[0-9a-f]{{8}}")
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return []
    handled = []
    for name in names:
        match = pattern.fullmatch(name)
        if match is None or _owner_alive(int(match.group(1))):
            continue
        path = target.parent / name
        if not target.exists() and not target.is_symlink():
            os.replace(path, target)
            log.warning("restored %s from %s: a writer that was replacing it was killed between its two renames",
                        target, name)
        else:
            shutil.rmtree(path, ignore_errors=True)
        handled.append(path)
    return handled


def remove_stale_staging(target: str | os.PathLike) -> list[Path]:
    """Remove the hidden staging folders and files of `target` whose writer was killed; the removed paths.

    Only siblings named `.NAME.staging.HOST.PID.RANDOM` (NAME the target's, HOST this host's) whose
    process PID is no longer running are removed; one INFO line on the "flaxdose" logger lists them.
    Every writer of this module calls it first.
    """
    removed = _restore_previous(Path(target)) + _stale_staging(Path(target))
    if removed:
        log.info("removed %d staging folder(s)/file(s) left by interrupted writers of %s: %s",
                 len(removed), target, ", ".join(p.name for p in removed))
    return removed


def new_staging(target: str | os.PathLike, folder: bool) -> Path:
    """Create an empty hidden staging folder (or file) beside `target`, named for this process.

    Stale staging of `target` is removed first (`remove_stale_staging`). Private to the owner while
    written: mode 0o700 (folder) or 0o600 (file); the caller gives it the umask's mode
    (`_publish_mode`) and renames it into place, or removes it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    prefix = f".{target.name}.staging.{_host()}.{os.getpid()}."
    while True:
        path = target.parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            if folder:
                os.mkdir(path, 0o700)
            else:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            return path
        except FileExistsError:
            continue


def _publish_mode(path: Path, folder: bool) -> None:
    """Give a finished staging folder (or file) the mode a plain mkdir (or open) would have had: private
    while written, then readable as the user's umask allows (a TPS import or a colleague reads it)."""
    os.chmod(path, (0o777 if folder else 0o666) & ~_umask())


def _umask() -> int:
    """The process's umask: read from /proc on Linux (setting it to read it back races other threads)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    umask = os.umask(0o077)  # elsewhere: the classic set-and-restore, briefly private rather than open
    os.umask(umask)
    return umask


@contextlib.contextmanager
def staging_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a hidden scratch folder beside `target` (see `new_staging`), removed on exit whatever happens."""
    path = new_staging(target, folder=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(root: str | os.PathLike, overwrite: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a hidden temporary folder next to `root` that replaces `root` only on success.

    On any error (or interruption) the temporary folder is removed and `root` is untouched;
    one left by a killed process is removed by the next writer of `root` (`remove_stale_staging`).
    An existing `root` is replaced by renames (module docstring): the old folder is parked under
    a hidden name, the new one renamed into place, then the old one removed; an interruption
    between the renames renames the old folder back, so one complete copy always exists.
    Raises FlaxdoseError up front when `root` holds files and not `overwrite`, or (given `kind`, a key of
    `OUTPUT_KINDS`) holds files but is not an earlier output of that kind (`check_writable`).
    """
    root = Path(root)
    check_writable(root, overwrite, kind)
    tmp = new_staging(root, folder=True)
    previous = None
    try:
        yield tmp
        _publish_mode(tmp, folder=True)
        if root.exists() or root.is_symlink():
            previous = _previous_name(root)
            os.replace(root, previous)
        os.replace(tmp, root)
    except BaseException:
        if previous is not None and previous.exists() and not (root.exists() or root.is_symlink()):
            os.replace(previous, root)  # interrupted between the renames: the old folder back
            previous = None
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if previous is not None:
            if previous.is_dir() and not previous.is_symlink():
                shutil.rmtree(previous, ignore_errors=True)
            else:
                previous.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w") -> Iterator[IO]:
    """Yield a file open in `mode` ("w" or "wb") on a hidden sibling that is renamed to `path` on success.

    Readers see the old or the new file, never half; on any error the sibling is removed.
    """
    path = Path(path)
    tmp = new_staging(path, folder=False)
    try:
        with open(tmp, mode) as f:
            yield f
        _publish_mode(tmp, folder=False)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a file through a temporary sibling and a rename: readers see the old or the new file, never half."""
    with atomic_file(path, "w") as f:
        f.write(text)
    return Path(path)
