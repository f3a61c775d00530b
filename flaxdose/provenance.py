"""Where a reported number came from: the code's git commit and the machine, for every report."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commit() -> str | None:
    """Short hash of the checked-out commit, with "+dirty" if tracked files changed; None outside git."""
    git = ["git", "-C", str(REPO)]
    try:
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + "+dirty" if dirty else head) if head else None


def machine() -> str:
    """One line: the JAX devices, CPU cores, architecture and versions."""
    import jax  # here, not at import: commands import this module before their XLA flags are set

    devices = jax.local_devices()
    kind = devices[0].device_kind if devices else "?"
    return (f"{len(devices)} x {kind} ({jax.default_backend()}), {os.cpu_count()} CPU cores, "
            f"{platform.machine()}, Python {platform.python_version()}, jax {jax.__version__}")
