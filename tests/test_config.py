import importlib

import pytest

from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError


def test_names_paths_and_overrides(tmp_path):
    config = config_lib.load_config("source", ["train.steps=10", "model.dtype=bfloat16", "data.patch_shape=(48,48,24)"])
    assert config.train.steps == 10 and config.model.dtype == "bfloat16" and tuple(config.data.patch_shape) == (48, 48, 24)
    assert config.train.learning_rate == 1e-4 and tuple(config.data.patch_shape) != ()
    path = tmp_path / "mine.py"
    path.write_text("from configs import quick\n\ndef get_config():\n    c = quick.get_config()\n    c.seed = 7\n    return c\n")
    assert config_lib.load_config(str(path)).seed == 7
    assert {"source", "quick"} <= set(config_lib.available_configs())


@pytest.mark.parametrize(
    "name, overrides, message",
    [
        ("nonesuch", [], "available: .*quick.*source"),
        ("quick", ["train.steps"], "malformed override"),
        ("quick", ["train.stepz=3"], "no key 'train.stepz'"),
        ("quick", ["trian.steps=3"], "no config section 'trian'"),
        ("quick", ["train.steps=ten"], "cannot parse 'ten'"),
        ("quick", ["data.flip_lr=1"], "expected a bool"),
    ],
)
def test_config_errors(name, overrides, message):
    with pytest.raises(FlaxdoseError, match=message):
        config_lib.load_config(name, overrides)


def test_cli_parser_takes_overrides_aside(monkeypatch):
    importlib.import_module("flaxdose.train")  # defines --config and --workdir
    from flaxdose import cli

    monkeypatch.setattr(cli, "CONFIG_OVERRIDES", [])
    argv = ["prog", "--config=quick", "--config.train.steps=5", "--config.seed", "3", "--workdir=/tmp/x"]
    rest = cli.parse_flags_with_overrides(argv)
    assert cli.CONFIG_OVERRIDES == ["--config.train.steps=5", "--config.seed=3"] and rest == ["prog"]


def test_every_shipped_config_loads_and_builds_a_model():
    from flaxdose.model import UNetSpec

    from flaxdose.sweep import check_grid

    for name in config_lib.available_configs():
        config = config_lib.load_config(name)
        if "grid" in config:  # a sweep: its grid is valid for its data, its runs train `base`
            check_grid(config, {style: n_train for style, (n_train, _) in config.data.plans.items()})
            config = config.base
        spec = UNetSpec.from_config(config.model)
        assert spec.in_channels == len(config.data.structures), name
        assert all(p % spec.factor == 0 for p in config.data.patch_shape), name
