"""Transfer learning: adapt a source model to a new planning style.

The paper's recipe (mode ``paper``): load the source model, freeze the first half of the
network (here the `encoder` and `bottleneck` subtrees: everything before the first
up-sampling), train the second half (`decoder` + `head`) and randomly re-initialize the
very last layer (`head`), with the learning rate reduced to 1e-5. Frozen parameters get
`optax.set_to_zero()` through `optax.multi_transform` (`flaxdose.training.optim`), so they stay
bit-identical and carry no Adam moments.

Further modes, beyond the paper:
- ``full``: fine-tune everything; ``decoder``: the paper's recipe without head re-init;
- ``head``: train only the 1x1x1 output layer; ``norm_head``: GroupNorm scales/offsets + head.
"""

from __future__ import annotations

import dataclasses

import jax

from flaxdose.checkpoint import check_params_shapes, restore_params
from flaxdose.data.pipeline import InputSpec
from flaxdose.errors import FlaxdoseError
from flaxdose.model import SUBTREES, UNetSpec, count_params, init_params
from flaxdose.run import Run, is_package

TRAINABLE, FROZEN = "trainable", "frozen"


@dataclasses.dataclass(frozen=True)
class Mode:
    """A transfer mode: which top-level subtrees train, whether the head is re-initialized, and
    whether every GroupNorm scale/offset trains too; all other parameters are frozen."""

    trainable: tuple[str, ...]  # top-level subtrees that train
    reinit_head: bool = False
    norms: bool = False  # also train every GroupNorm scale/offset


MODES = {
    "paper": Mode(("decoder", "head"), reinit_head=True),
    "full": Mode(SUBTREES),
    "decoder": Mode(("decoder", "head")),
    "head": Mode(("head",)),
    "norm_head": Mode(("head",), norms=True),
}


def is_transfer(config) -> bool:
    """Whether a run config fine-tunes a source model (``transfer.mode`` set and not "none")."""
    return bool(config.get("transfer")) and config.transfer.mode != "none"


def get_mode(name: str) -> Mode:
    """The `Mode` of a name in `MODES`; raises FlaxdoseError for an unknown one."""
    if name not in MODES:
        raise FlaxdoseError(f"unknown transfer mode {name!r}; choose one of {sorted(MODES)} (or 'none' to train from scratch)")
    return MODES[name]


def param_labels(params, mode: Mode):
    """Label every parameter leaf TRAINABLE or FROZEN, by top-level subtree (and GroupNorm)."""

    def label(path, _):
        keys = [str(getattr(k, "key", k)) for k in path]
        is_norm = any(k.startswith("norm") for k in keys)
        return TRAINABLE if keys[0] in mode.trainable or (mode.norms and is_norm) else FROZEN

    return jax.tree_util.tree_map_with_path(label, params)


def count_by_label(params, mode: Mode) -> dict[str, int]:
    """Number of trainable and frozen parameters: {TRAINABLE: n, FROZEN: m}."""
    labels = jax.tree_util.tree_leaves(param_labels(params, mode))
    sizes = [p.size for p in jax.tree_util.tree_leaves(params)]
    return {lab: sum(s for s, l in zip(sizes, labels) if l == lab) for lab in (TRAINABLE, FROZEN)}


def source_of(config) -> str:
    """The fine-tune's source model path (``transfer.source``); raises FlaxdoseError when unset."""
    if not config.transfer.source:
        raise FlaxdoseError(
            "transfer needs the source model: pass --source=SOURCE_WORKDIR (or --config.transfer.source=PATH)"
        )
    if is_package(config.transfer.source):  # Run.open's message would suggest --data, which train has not
        raise FlaxdoseError(f"--source {config.transfer.source} is a model package: a package holds the weights for "
                            "prediction, not the training run a fine-tune starts from; pass the source model's "
                            "training workdir (the one the package was exported from)")
    return config.transfer.source


def check_source(config, spec: UNetSpec) -> None:
    """Refuse, before anything is generated or written, a fine-tune whose mode is unknown or
    whose source model is missing or of another architecture (`init_transfer` would later)."""
    get_mode(config.transfer.mode)
    source = source_of(config)
    check_source_inputs(config, source)
    template = jax.eval_shape(lambda: init_params(spec, jax.random.key(0), config.data.patch_shape))
    check_params_shapes(source, template, fix="a fine-tune keeps the source's architecture: pass the source run's "
                        f"model settings (--config.model.*, see {source}/config.json)")


def check_source_inputs(config, source) -> None:
    """Refuse a fine-tune whose inputs (`InputSpec`: structures, the target-distance mode, the CT channel)
    differ from the source's, naming the settings that fix it (the parameter shapes alone would not say which)."""
    theirs = InputSpec.from_config(Run.open(source).config)
    ours = InputSpec.from_config(config)
    fixes = []
    if theirs.target_distance != ours.target_distance:
        fixes.append(f"--config.data.target_distance={theirs.target_distance}")
    if theirs.include_ct != ours.include_ct:
        fixes.append(f"--config.data.include_ct={theirs.include_ct}")
    if theirs.structures != ours.structures:
        fixes.append(f"--config.data.structures='{theirs.structures}'")
    if fixes:
        raise FlaxdoseError(f"the source model {source} takes other inputs ({theirs.describe()}); pass "
                            f"{' '.join(fixes)} --config.model.in_channels={theirs.channels} (see its config.json)")


def init_transfer(config, spec: UNetSpec, rng: jax.Array) -> tuple[dict, dict]:
    """(params, metadata) of a fine-tune's start: the source model's params, the head re-initialized per mode.

    The optimizer comes from `flaxdose.training.optim.make_optimizer`. Raises FlaxdoseError without a
    source (``transfer.source``), for an unknown mode, or a source of another architecture.
    """
    mode = get_mode(config.transfer.mode)
    source = source_of(config)
    fresh = init_params(spec, rng, config.data.patch_shape)
    params, source_meta = restore_params(source, fresh)
    if mode.reinit_head:
        params = {**params, "head": fresh["head"]}
    counts = count_by_label(params, mode)
    meta = {
        "transfer_source": str(source),
        "transfer_source_step": source_meta.get("step"),
        "transfer_mode": config.transfer.mode,
        "trainable_params": counts[TRAINABLE],
        "frozen_params": counts[FROZEN],
        "total_params": count_params(params),
    }
    return params, meta
