"""Experiment configs: `configs/NAME.py` files with `get_config()` (installed as `flaxdose.configs`).

`load_config("source")` runs `configs/source.py`; `"transfer:external"` passes "external"
to a parameterised `get_config(arg)`; a path to any `.py` file with a `get_config()` works
too. On the command line `flaxdose.cli` resolves ``--config=NAME`` to that path and
`ml_collections.config_flags` applies the ``--config.section.key=value`` overrides; library
code passes overrides as a flat mapping, ``{"train.steps": 10}``.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_collections

from flaxdose.errors import FlaxdoseError

CONFIG_DIR = Path(importlib.util.find_spec("flaxdose.configs").submodule_search_locations[0])


def available_configs() -> list[str]:
    """Names of the shipped configs (files in configs/ with a get_config(), not starting with "_")."""
    return sorted(
        p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_") and "def get_config" in p.read_text()
    )


def config_path(name_or_path: str) -> str:
    """The file (and ``:argument``) a config name or path stands for; raises FlaxdoseError if missing.

    ``"source"`` -> ``".../configs/source.py"``, ``"transfer:external"`` ->
    ``".../configs/transfer.py:external"``; a path (with a ``/`` or ending in ``.py``) stays a path.
    """
    name, sep, argument = name_or_path.partition(":")
    candidate = Path(name)
    if candidate.suffix == ".py" or candidate.parent != Path("."):
        if not candidate.is_file():
            raise FlaxdoseError(f"config file {candidate} does not exist")
        return str(candidate) + sep + argument
    path = CONFIG_DIR / f"{name}.py"
    if not path.is_file() or name.startswith("_"):
        raise FlaxdoseError(
            f"unknown config {name!r}; available: {', '.join(available_configs())} "
            "(or pass a path to a .py file with get_config())"
        )
    return str(path) + sep + argument


def load_config(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The locked ConfigDict of a config name or path, with flat overrides applied.

    `overrides` maps dotted keys to values (``{"train.steps": 10}``); a value must keep the
    type of the default it replaces (ints are accepted for floats). Raises FlaxdoseError for
    an unknown config, a file without get_config(), an unknown key or a wrong type.
    """
    path, _, argument = config_path(name_or_path).partition(":")
    spec = importlib.util.spec_from_file_location(f"flaxdose_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise FlaxdoseError(f"config file {path} has no get_config() function")
    config = module.get_config(argument) if argument else module.get_config()
    config.lock()  # overrides may change values, never invent keys
    return override(config, overrides or {})


def override(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Apply flat dotted overrides in place (see `load_config`) and return `config`."""
    try:
        config.update_from_flattened_dict(dict(overrides))
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        message = e.args[0] if e.args else e
        raise FlaxdoseError(f"config override {dict(overrides)}: {message}") from None
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    """The resolved config as JSON (what a run saves as config.json)."""
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n"


def load_config_json(path: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a training run saved as config.json."""
    try:
        return ml_collections.ConfigDict(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise FlaxdoseError(f"cannot read the run config {path}: {e}") from None
