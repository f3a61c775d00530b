"""Shared shape of the sweep configs (`python -m flaxdose.launch.sweep --config=sweep_NAME`).

A sweep config holds:
- `base`: the run config every fine-tune starts from (model, patches, steps, batch size);
  its data, seed, transfer mode and learning rate are set per run by the sweep;
- `source`: `path` of a trained source workdir, or "" to train one on the `source` style
  with `base` plus the `source.train` overrides;
- `data`: built-in synthetic `plans` per style as (train, test) counts, their `scale` and
  `seed`, and `folders`: style name -> dataset folder for your own plans (its train split is
  what the grid draws from, its test split what every run is scored on);
- `grid`: `targets` (style -> numbers of training plans), `modes`, `seeds`,
  `learning_rates` (transfer modes) and `scratch_learning_rates` (the from-scratch control);
- `runs_per_device` (runs vmapped on one device) and `max_devices` (0 = all local devices).
"""

import ml_collections

from flaxdose.synthetic.styles import PAPER_SPLITS


def sweep_config(base, targets: dict, modes, seeds, learning_rates, scratch_learning_rates, *, source_train: dict,
                 plans: dict | None = None, scale: float = 0.5, runs_per_device: int = 1) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.base = base
    c.source = ml_collections.ConfigDict(dict(path="", val_cases=base.data.val_cases, train=source_train))
    plans = plans or {style: PAPER_SPLITS[style] for style in ("source", *targets)}
    c.data = ml_collections.ConfigDict(dict(plans=plans, scale=scale, seed=0, folders={}))
    c.grid = ml_collections.ConfigDict(dict(targets=targets, modes=tuple(modes), seeds=tuple(seeds),
                                            learning_rates=tuple(learning_rates),
                                            scratch_learning_rates=tuple(scratch_learning_rates)))
    c.runs_per_device = runs_per_device
    c.max_devices = 0
    return c
