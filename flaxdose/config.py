"""Experiment configs: `configs/NAME.py` files with `get_config()`, plus dotted overrides.

`load_config("source")` imports `configs/source.py`; a path to any `.py` file with a
`get_config()` works too. Overrides are strings like ``"train.steps=10"`` (the part after
``--config.`` on the command line); values are parsed as Python literals and must keep the
type of the default they replace.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from flaxdose.errors import FlaxdoseError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def available_configs() -> list[str]:
    return sorted(
        p.stem for p in CONFIG_DIR.glob("*.py") if not p.stem.startswith("_") and "def get_config" in p.read_text()
    )


def config_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix == ".py" or candidate.parent != Path("."):
        if not candidate.is_file():
            raise FlaxdoseError(f"config file {candidate} does not exist")
        return candidate
    path = CONFIG_DIR / f"{name_or_path}.py"
    if not path.is_file():
        raise FlaxdoseError(
            f"unknown config {name_or_path!r}; available: {', '.join(available_configs())} "
            "(or pass a path to a .py file with get_config())"
        )
    return path


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path = config_path(name_or_path)
    spec = importlib.util.spec_from_file_location(f"flaxdose_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise FlaxdoseError(f"config file {path} has no get_config() function")
    config = module.get_config()
    config.lock()  # overrides may change values, never invent keys
    for override in overrides:
        apply_override(config, override)
    return config


def apply_override(config: ml_collections.ConfigDict, override: str) -> None:
    """Apply one ``"a.b.c=value"`` override in place."""
    key, sep, raw = override.partition("=")
    key = key.strip().removeprefix("--").removeprefix("config.")
    if not sep or not key:
        raise FlaxdoseError(f"malformed override {override!r}; write it as --config.section.key=value")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
        if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
            raise FlaxdoseError(f"override {override!r}: no config section {'.'.join(parents[: i + 1])!r}")
        node = node[part]
    if leaf not in node:
        raise FlaxdoseError(
            f"override {override!r}: no key {key!r}; keys here are {sorted(node.keys())}"
        )
    value = _parse_value(raw.strip(), node[leaf])
    try:
        with node.unlocked():
            node[leaf] = value
    except (TypeError, ValueError) as e:
        raise FlaxdoseError(f"override {override!r}: {e}") from None


def _parse_value(raw: str, default):
    if isinstance(default, str):
        return raw  # strings never need quotes on the command line
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise FlaxdoseError(
            f"cannot parse {raw!r} as a {type(default).__name__} (the type of the default {default!r})"
        ) from None
    if isinstance(default, bool) != isinstance(value, bool) and default is not None:
        raise FlaxdoseError(f"expected a bool like {default!r}, got {raw!r}")
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        value = type(default)(value)
    return value


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list) + "\n"


def load_config_json(path: str | Path) -> ml_collections.ConfigDict:
    """The resolved config a training run saved as config.json."""
    try:
        return ml_collections.ConfigDict(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise FlaxdoseError(f"cannot read the run config {path}: {e}") from None
