"""Writing folders so that nothing half-written is ever left behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from flaxdose.errors import FlaxdoseError


def check_writable(root: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse to replace a non-empty folder (or a file) unless asked to; call before long work.

    Raises FlaxdoseError when `root` is a file or a non-empty folder and not `overwrite`.
    """
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())) and not overwrite:
        raise FlaxdoseError(f"{root} already holds files; choose an empty folder or pass --overwrite")


@contextlib.contextmanager
def atomic_folder(root: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a hidden temporary folder next to `root` that replaces `root` only on success.

    On any error (or interruption) the temporary folder is removed and `root` is untouched.
    Raises FlaxdoseError up front when `root` holds files and not `overwrite` (`check_writable`).
    """
    root = Path(root)
    check_writable(root, overwrite)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.", suffix=".tmp"))
    try:
        yield tmp
        if root.exists():
            shutil.rmtree(root)
        os.replace(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a file through a temporary sibling and a rename: readers see the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
