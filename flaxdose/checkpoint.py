"""orbax checkpoints of a workdir.

- ``<workdir>/checkpoints/<step>/``: the latest few full states (params, optimizer state,
  and a JSON `meta` holding the grain iterator state of the last consumed batch) for resuming; orbax writes each to a temporary folder and renames
  it, so a run killed mid-save leaves the previous checkpoint intact.
- ``<workdir>/best/<step>/``: params + meta of the lowest validation loss so far, for
  prediction and transfer learning.

Every meta holds ``params_sha256`` (`params_digest`); a restore recomputes it, so a changed byte in
the stored weights is refused, never predicted with (orbax checks no content on its own).

States are stored unreplicated, so a checkpoint written with N devices restores on any
device count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from flaxdose.errors import FlaxdoseError

CHECKPOINTS, BEST = "checkpoints", "best"


class _DropReadOnlyNotice(logging.Filter):
    """orbax warns on every read-only manager, i.e. on every model load; that is expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Given directory is read only")


logging.getLogger("absl").addFilter(_DropReadOnlyNotice())


def _manager(directory: Path, items: tuple[str, ...], keep: int, read_only: bool = False):
    handlers = {name: ocp.StandardCheckpointHandler() for name in items}
    handlers["meta"] = ocp.JsonCheckpointHandler()
    # Own barrier names per folder: in multi-process runs `checkpoints` and `best` save the same
    # step concurrently, and orbax's default barrier keys (by step) would collide.
    multiprocess = ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=Path(directory).name)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, read_only=read_only, create=not read_only,
                                           save_interval_steps=0 if read_only else 1,
                                           multiprocessing_options=multiprocess)
    # orbax needs absolute paths; users pass relative workdirs
    return ocp.CheckpointManager(epath.Path(Path(directory).resolve()), item_handlers=handlers, options=options)


class WorkdirCheckpoints:
    """Save and restore a training run's checkpoints (see the module docstring).

    Keeps the latest `keep` full states under ``<workdir>/checkpoints`` and one best state under
    ``<workdir>/best``; `best_val` is the lowest validation loss saved so far (None before any).
    """

    def __init__(self, workdir: str | os.PathLike, keep: int = 2):
        workdir = Path(workdir)
        self.latest = _manager(workdir / CHECKPOINTS, ("params", "opt_state"), keep)
        self.best = _manager(workdir / BEST, ("params",), 1)
        self.best_val = _best_val(self.best)

    def latest_step(self) -> int | None:
        """Step of the latest full checkpoint, or None when there is none (a fresh run)."""
        return self.latest.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, val_loss: float | None = None):
        """Save a full state; also the params as `best` when `val_loss` improves on it.

        `meta` must be JSON-serializable; `step` and `val_loss` are added to it. Saves may finish
        asynchronously: call `wait` before reading them back.
        """
        meta = {**meta, "step": int(step), "val_loss": val_loss, "params_sha256": params_digest(params)}
        self.latest.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )
        if val_loss is not None and (self.best_val is None or val_loss < self.best_val):
            self.best_val = val_loss
            self.best.save(
                step,
                args=ocp.args.Composite(params=ocp.args.StandardSave(params), meta=ocp.args.JsonSave(meta)),
                force=True,
            )

    def restore(self, step: int, params, opt_state):
        """Restore the state saved at `step` into the structure of the given templates.

        Returns (params, opt_state, meta). Raises FlaxdoseError naming every parameter whose
        stored shape differs from `params` (a checkpoint of another model).
        """
        check_shapes(self.latest, step, params, f"checkpoint step {step}")
        args = ocp.args.Composite(
            params=ocp.args.StandardRestore(params),
            opt_state=ocp.args.StandardRestore(opt_state),
            meta=ocp.args.JsonRestore(),
        )
        step_dir = Path(self.latest.directory) / str(step)
        restored = read_or_refuse(lambda: self.latest.restore(step, args=args), step_dir)
        check_params_content(restored.params, restored.meta, step_dir)
        return restored.params, restored.opt_state, restored.meta

    def wait(self):
        """Block until every pending (asynchronous) save has been written."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self):
        """Finish pending saves and release both orbax managers."""
        self.latest.close()
        self.best.close()


def read_or_refuse(read: Callable, step_dir: Path):
    """`read()`, with any failure of orbax/TensorStore on damaged or missing files (a truncated or
    half-copied array file, a lost metadata file) turned into one FlaxdoseError naming the step folder
    and the fix (`damaged`)."""
    try:
        return read()
    except FlaxdoseError:
        raise
    except Exception as e:  # TensorStore and orbax raise ValueError, OSError, JSONDecodeError or plain Exception
        _quiet_abandoned_reads()
        detail = _missing_files(Path(step_dir)) or _unreadable_json(Path(step_dir)) or _failure_detail(e)
        raise damaged(step_dir, detail) from None


def _quiet_abandoned_reads() -> None:
    """Silence the echoes of a failed orbax read, once it is reported as one error: orbax closes its event loop
    at the first failed array, and each read still in flight then fails to call back into it (a traceback
    per array, "RuntimeError: Event loop is closed", through `sys.unraisablehook`), the abandoned read
    coroutines of the other damaged arrays raise when they are collected (through the same hook), and
    asyncio logs "Future exception was never retrieved". Only those are dropped; everything else passes
    as before."""
    previous = sys.unraisablehook
    if getattr(previous, "_flaxdose_quiet", False):
        return

    def hook(unraisable):
        code = getattr(unraisable.object, "cr_code", None)  # an abandoned read coroutine of orbax, closed
        if (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed") \
                or (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename):
            return
        previous(unraisable)

    hook._flaxdose_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_DropAbandonedFutures())


class _DropAbandonedFutures(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Future exception was never retrieved")


# The files orbax writes into every item folder of a step (`_manager`'s handlers), which it needs to read it.
_ITEM_FILES = {"params": ("_METADATA", "manifest.ocdbt"), "opt_state": ("_METADATA", "manifest.ocdbt"),
               "meta": ("metadata",)}


def _missing_files(step_dir: Path) -> str:
    """"missing folder meta; missing file(s) params/_METADATA, ..." of a step folder (a `best/` step holds no
    opt_state), or ""."""
    items = [i for i in _ITEM_FILES if not (i == "opt_state" and step_dir.parent.name == BEST)]
    folders = [i for i in items if not (step_dir / i).is_dir()]
    files = [f"{i}/{name}" for i in items if i not in folders for name in _ITEM_FILES[i] if not (step_dir / i / name).exists()]
    parts = ([f"missing folder{'s' if len(folders) > 1 else ''} {', '.join(folders)}"] if folders else []) + \
            ([f"missing file{'s' if len(files) > 1 else ''} {', '.join(files)}"] if files else [])
    return "; ".join(parts)


def _unreadable_json(step_dir: Path) -> str:
    """"unreadable file params/_METADATA (...)" for the first of a step folder's JSON files that does not parse, or ""."""
    for name in ("params/_METADATA", "opt_state/_METADATA", "meta/metadata"):
        path = step_dir / name
        if path.is_file():
            try:
                json.loads(path.read_bytes())
            except ValueError:  # JSONDecodeError and UnicodeDecodeError
                return f"unreadable file {name}: not valid JSON, cut short or overwritten"
    return ""


def _failure_detail(error: BaseException) -> str:
    """What orbax/TensorStore said, short: the damaged file where it names one, else its first line."""
    chain, cause = [], error
    while cause is not None and len(chain) < 8:  # orbax wraps TensorStore's error, which names the file
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    text = "\n".join(str(c) for c in reversed(chain))
    first = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    first = first.split(" See full TensorStore details")[0].split(" [tensorstore_spec=")[0]
    kind = next((k for k in ("NOT_FOUND", "DATA_LOSS", "OUT_OF_RANGE") if k in text), "")
    what = {"NOT_FOUND": "missing", "OUT_OF_RANGE": "truncated"}.get(kind, "unreadable")
    array = re.findall(r'Error reading "([^"/]+)/([^"]+)" in OCDBT database', text)
    files = re.findall(r'local file "([^"]+)"', text)
    if array and not array[-1][1].startswith(".") and files:  # an array's data, not its .zarray header
        kind_of = "parameter" if files[-1].rstrip("/").endswith("params") else "array"
        return f"{what} data of {kind_of} {array[-1][0].replace('.', '/')} in {files[-1]}"
    missing = re.findall(r"File (\S+) not found", text)
    if missing:
        return f"missing file {missing[-1]}"
    if files:
        return f"{what} files in {files[-1]}" if files[-1].endswith("/") else f"{what} file {files[-1]}"
    return f"{type(error).__name__}: {first[:160]}"


def params_digest(params) -> str:
    """SHA-256 (hex) over every parameter's tree path, dtype, shape and float bytes, in tree order."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        leaf = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}|{leaf.dtype}|{leaf.shape}|".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def check_params_content(params, meta: dict | None, step_dir: Path) -> None:
    """Refuses restored `params` holding non-finite values or differing from the ``params_sha256``
    their checkpoint recorded at save (checkpoints written before the digest skip that check):
    the `damaged` FlaxdoseError, so a corrupted weight never becomes a silently wrong dose."""
    bad = [jax.tree_util.keystr(p) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]
           if not np.isfinite(np.asarray(v)).all()]
    if bad:
        raise damaged(step_dir, f"non-finite weights in {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}")
    recorded = (meta or {}).get("params_sha256")
    if recorded and recorded != params_digest(params):
        raise damaged(step_dir, "its weights differ from the SHA-256 recorded when it was saved: a changed byte")


def damaged(step_dir: Path, detail: str) -> FlaxdoseError:
    """The error for a checkpoint step folder whose files are damaged or incomplete: it names the folder,
    `detail` (what is wrong), and what deleting that folder falls back to (`_fallback`)."""
    step_dir = Path(step_dir)
    return FlaxdoseError(
        f"checkpoint {step_dir} is damaged ({detail}); delete that step folder (rm -r {shlex.quote(str(step_dir))}) "
        f"{_fallback(step_dir)}, or copy it again whole if it came from elsewhere"
    )


def _fallback(step_dir: Path) -> str:
    """What a workdir falls back to once the damaged `step_dir` is deleted, as the rest of a sentence."""
    folder, step = step_dir.parent, int(step_dir.name) if step_dir.name.isdigit() else None
    earlier = [s for s in saved_steps(folder) if step is None or s < step]
    if folder.name == BEST:
        latest = saved_steps(folder.parent / CHECKPOINTS)
        if latest:
            return f"to fall back to the latest training checkpoint ({CHECKPOINTS}/{max(latest)})"
        return "and retrain (no other checkpoint is left in that workdir)"
    if earlier:
        return f"to fall back to the previous checkpoint (step {max(earlier)}; rerunning training resumes from it)"
    return "and retrain (no earlier checkpoint is left: rerunning training starts that run again from step 0)"


def _best_val(manager) -> float | None:
    step = manager.latest_step()
    if step is None:
        return None
    meta = read_or_refuse(lambda: manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta,
                          Path(manager.directory) / str(step))
    return (meta or {}).get("val_loss")


def check_shapes(manager, step: int, params, what: str,
                 fix: str = "use the model config it was trained with, or another workdir") -> None:
    """Raise a FlaxdoseError naming every parameter whose stored shape differs from `params`, and `fix`;
    for a step folder whose parameter metadata is missing or damaged, the `damaged` error instead."""
    step_dir = Path(manager.directory) / str(step)
    stored = read_or_refuse(lambda: manager.item_metadata(step)["params"], step_dir)
    stored = getattr(stored, "tree", stored)
    if not jax.tree_util.tree_leaves(stored):  # orbax reads a missing params/_METADATA as no parameters at all
        raise damaged(step_dir, (_missing_files(step_dir) or "no parameter metadata") + ": the folder is incomplete, "
                                "no parameter can be read")
    flat_stored = dict(jax.tree_util.tree_flatten_with_path(stored)[0])
    flat_new = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    name = lambda path: "/".join(str(getattr(k, "key", k)) for k in path)
    diffs = []
    for path in sorted(set(flat_stored) | set(flat_new), key=name):
        a, b = flat_stored.get(path), flat_new.get(path)
        shape_a = tuple(a.shape) if a is not None else "missing"
        shape_b = tuple(np.shape(b)) if b is not None else "missing"
        if shape_a != shape_b:
            diffs.append(f"{name(path)}: stored {shape_a} vs model {shape_b}")
    if diffs:
        shown = "; ".join(diffs[:6]) + (f"; and {len(diffs) - 6} more" if len(diffs) > 6 else "")
        raise FlaxdoseError(
            f"{what} holds a different model ({len(diffs)} parameter shapes differ: {shown}); {fix}"
        )


def saved_steps(directory: str | os.PathLike) -> list[int]:
    """Steps of the finished checkpoints in a manager folder (orbax renames a step folder into place when done)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(int(p.name) for p in directory.glob("[0-9]*") if p.name.isdigit() and (p / "params").is_dir())


def find_checkpoint(path: str | os.PathLike, which: str = "best") -> tuple[Path, int]:
    """Resolve a workdir, a checkpoints folder or one step folder to (manager dir, step).

    For a workdir, `which="best"` prefers ``best/`` and falls back to ``checkpoints/``; any other
    value takes ``checkpoints/`` (the latest step). Raises FlaxdoseError when `path` does not
    exist or holds no finished checkpoint, and (`damaged`) when the newest step folder lacks its
    parameters (it is never passed over for an older checkpoint unseen).
    """
    path = Path(path)
    if not path.exists():
        raise FlaxdoseError(f"checkpoint path {path} does not exist")
    if (path / "params").is_dir() and path.name.isdigit():
        return path.parent, int(path.name)
    candidates = [path / BEST, path / CHECKPOINTS] if which == "best" else [path / CHECKPOINTS]
    for directory in [*candidates, path]:
        steps = saved_steps(directory)
        broken = [p for p in directory.glob("[0-9]*") if p.name.isdigit() and p.is_dir() and int(p.name) not in steps]
        newest = max(broken, key=lambda p: int(p.name), default=None)
        if newest is not None and (not steps or int(newest.name) > max(steps)):  # never passed over unseen
            raise damaged(newest, _missing_files(newest) or "missing folder params")
        if steps:
            return directory, max(steps)
    broken_package = (path / "params.npz").is_file()  # flaxdose.inference.package's weights without its metadata file
    raise FlaxdoseError(
        f"no orbax checkpoint found under {path}; pass a training workdir, its checkpoints/ or best/ "
        "folder, or one step folder" + ("; it holds params.npz but no flaxdose_model.json: a model package "
                                        "copied incompletely? copy it again whole" if broken_package else "")
    )


def check_params_shapes(path: str | os.PathLike, params_template, fix: str, which: str = "best") -> None:
    """Check a checkpoint's stored parameter shapes against `params_template` without reading
    the arrays. Raises FlaxdoseError when there is no checkpoint or the shapes differ (saying `fix`)."""
    directory, step, manager = _open_read_only(path, which)
    try:
        check_shapes(manager, step, params_template, f"checkpoint {directory / str(step)}", fix)
    finally:
        manager.close()


def _open_read_only(path: str | os.PathLike, which: str):
    """(manager dir, step, read-only orbax manager) of the checkpoint `find_checkpoint` resolves."""
    directory, step = find_checkpoint(path, which)
    items = ("params",) if directory.name == BEST else ("params", "opt_state")
    return directory, step, _manager(directory, items, keep=None, read_only=True)


def restore_params(path: str | os.PathLike, params_template=None, which: str = "best"):
    """Params only (no optimizer state) from a workdir or checkpoint path, as numpy arrays.

    With `params_template`, the stored shapes are checked against it first.
    Returns (params, meta). Raises FlaxdoseError when no checkpoint is found (see
    `find_checkpoint`) or the stored shapes differ from the template's.
    """
    directory, step, manager = _open_read_only(path, which)
    try:
        if params_template is not None:
            check_shapes(manager, step, params_template, f"checkpoint {directory / str(step)}")
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = None if params_template is None else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=device), params_template
        )
        args = ocp.args.Composite(params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore())
        restored = read_or_refuse(lambda: manager.restore(step, args=args), directory / str(step))
    finally:
        manager.close()
    params = jax.tree.map(np.asarray, restored.params)
    check_params_content(params, restored.meta, directory / str(step))
    return params, dict(restored.meta or {})
