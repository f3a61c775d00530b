import jax
import ml_collections
import numpy as np
import optax
import pytest

from flaxdose import checkpoint
from flaxdose.errors import FlaxdoseError
from flaxdose.model import init_params, preset
from flaxdose.training import optim, trainer, transfer


@pytest.fixture(scope="module")
def source_workdir(tiny_run):
    return tiny_run[0]  # conftest's tiny run (quick's recipe, 2 steps): read, never trained further


def transfer_config(make_config, source, mode="paper", **overrides):
    return make_config(**{"transfer.mode": mode, "transfer.source": str(source), "data.seed": 1,
                          "transfer.learning_rate": 1e-2, **overrides})


def leaves_by_subtree(params):
    return {k: jax.tree_util.tree_leaves(v) for k, v in params.items()}


def test_paper_mode_freezes_encoder_and_reinitializes_head(tmp_path, source_workdir, make_config):
    source, _ = checkpoint.restore_params(source_workdir)
    trainer.train_and_evaluate(transfer_config(make_config, source_workdir), tmp_path)
    tuned, meta = checkpoint.restore_params(tmp_path, which="latest")
    src, new = leaves_by_subtree(source), leaves_by_subtree(tuned)
    for frozen in ("encoder", "bottleneck"):
        for a, b in zip(src[frozen], new[frozen]):
            np.testing.assert_array_equal(a, b)  # bit-identical
    for trained in ("decoder", "head"):
        assert any(not np.array_equal(a, b) for a, b in zip(src[trained], new[trained]))
    assert meta["transfer_mode"] == "paper" and meta["frozen_params"] > 0


def test_head_is_reinitialized_before_training(source_workdir, make_config):
    config = transfer_config(make_config, source_workdir)
    spec = trainer.UNetSpec.from_config(config.model)
    source, _ = checkpoint.restore_params(source_workdir)
    params, _ = transfer.init_transfer(config, spec, jax.random.key(5))
    assert not np.array_equal(params["head"]["kernel"], source["head"]["kernel"])
    np.testing.assert_array_equal(params["decoder"]["level0"]["conv0"]["kernel"], source["decoder"]["level0"]["conv0"]["kernel"])
    config.transfer.mode = "decoder"
    params, _ = transfer.init_transfer(config, spec, jax.random.key(5))
    np.testing.assert_array_equal(params["head"]["kernel"], source["head"]["kernel"])


def test_frozen_leaves_carry_no_adam_moments():
    params = init_params(preset("tiny"), jax.random.key(0))
    mode = transfer.get_mode("paper")
    config = ml_collections.ConfigDict({"transfer": {"mode": "paper", "learning_rate": 1e-5}})
    opt_state = optim.make_optimizer(config, params).init(params)
    moments = [
        x for x in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.MaskedNode))
        if not isinstance(x, optax.MaskedNode) and np.ndim(x) > 0
    ]
    counts = transfer.count_by_label(params, mode)
    assert sum(np.size(m) for m in moments) == 2 * counts["trainable"]  # mu and nu, trainable only
    assert counts["frozen"] == sum(np.size(p) for k in ("encoder", "bottleneck") for p in jax.tree_util.tree_leaves(params[k]))


@pytest.mark.parametrize("mode, trains", [("full", {"encoder", "bottleneck", "decoder", "head"}), ("head", {"head"}),
                                          ("norm_head", {"encoder", "bottleneck", "decoder", "head"})])
def test_modes_label_the_right_subtrees(mode, trains):
    params = init_params(preset("tiny"), jax.random.key(0))
    labels = transfer.param_labels(params, transfer.get_mode(mode))
    trained = {k for k, v in labels.items() if "trainable" in jax.tree_util.tree_leaves(v)}
    assert trained == trains
    if mode == "norm_head":
        assert labels["encoder"]["level0"]["conv0"]["kernel"] == "frozen"
        assert labels["encoder"]["level0"]["norm0"]["scale"] == "trainable"


def test_transfer_errors(tmp_path, source_workdir, make_config):
    with pytest.raises(FlaxdoseError, match="--source"):
        trainer.train_and_evaluate(transfer_config(make_config, ""), tmp_path / "a")
    with pytest.raises(FlaxdoseError, match="unknown transfer mode"):
        trainer.train_and_evaluate(transfer_config(make_config, source_workdir, mode="half"), tmp_path / "b")
    with pytest.raises(FlaxdoseError, match=r"15 parameter shapes differ: .*stored \(3, 3, 3, 4, 8\) vs model \(3, 3, 3, 8, 16\)"):
        trainer.train_and_evaluate(transfer_config(make_config, source_workdir, **{"model.features": (8, 16)}), tmp_path / "c")
    with pytest.raises(FlaxdoseError, match="no orbax checkpoint"):
        trainer.train_and_evaluate(transfer_config(make_config, tmp_path), tmp_path / "d")
    # the source (quick's recipe) takes the PTV-distance channel: the error names the settings, not shapes
    with pytest.raises(FlaxdoseError, match=r"target_distance=True --config.model.in_channels=7"):
        trainer.train_and_evaluate(transfer_config(make_config, source_workdir, **{"data.target_distance": False,
                                                                                    "model.in_channels": 6}), tmp_path / "f")
    package = tmp_path / "package"  # a model package (its metadata file is what marks one)
    package.mkdir()
    (package / "flaxdose_model.json").write_text("{}")
    with pytest.raises(FlaxdoseError, match=r"is a model package: .*pass the source model's training workdir") as e:
        trainer.train_and_evaluate(transfer_config(make_config, package), tmp_path / "g")
    assert "--data" not in str(e.value)  # train has no --data flag
    # all refused before the run's data was generated: nothing written
    assert not any((tmp_path / w).exists() for w in "abcdfg")
    with pytest.raises(FlaxdoseError, match=r"pass the source run's model settings \(--config.model.\*"):
        trainer.train_and_evaluate(transfer_config(make_config, source_workdir, **{"model.features": (8, 16)}), tmp_path / "e")
