"""Full-volume dose prediction.

``python -m flaxdose.predict --workdir W --data DIR --split test --out OUT`` predicts every
case of a split and writes them as a dataset of Cases whose `dose` is the prediction (Gy).

Whole volumes go through the network in one pass: the model zero-pads each volume to a
multiple of its down-sampling factor and crops the output back (no sliding window, so no
seams). Cases of one grid size are batched and share one compiled function. Dose is clipped
at 0 and converted from units of the prescription to Gy.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from absl import flags
from tqdm import tqdm

from flaxdose import cli
from flaxdose import config as config_lib
from flaxdose.checkpoint import find_checkpoint, restore_params
from flaxdose.data.case import Case, Dataset, check_writable, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.model import UNetSpec, init_params


class Model:
    """A trained model: architecture, parameters and the structures it expects, from a workdir."""

    def __init__(self, spec: UNetSpec, params, structures: Sequence[str], name: str = "model"):
        import jax

        from flaxdose.trainer import make_predict_fn

        self.spec, self.structures, self.name = spec, tuple(structures), name
        self.params = jax.device_put(params)
        self._predict = make_predict_fn(spec)

    @classmethod
    def load(cls, path: str | Path, which: str = "best") -> Model:
        """From a training workdir, or a checkpoint path inside one (config.json is found above it)."""
        import jax

        path = Path(path)
        directory, _ = find_checkpoint(path, which)
        config_file = next((p / "config.json" for p in [directory, *directory.parents] if (p / "config.json").is_file()), None)
        if config_file is None:
            raise FlaxdoseError(f"no config.json next to the checkpoint {directory}; pass the training workdir")
        config = config_lib.load_config_json(config_file)
        spec = UNetSpec.from_config(config.model)
        template = jax.eval_shape(lambda: init_params(spec, jax.random.key(0)))
        params, _ = restore_params(path, template, which)
        return cls(spec, params, config.data.structures, name=config_file.parent.name)

    def predict(self, cases: Sequence[Case], batch_size: int = 1, progress: bool = False) -> list[Case]:
        """Predicted dose (Gy) for each case, returned as copies of the cases with `dose` replaced."""
        out: dict[int, Case] = {}
        by_shape: dict[tuple, list[int]] = {}
        for i, case in enumerate(cases):
            case.check_structures(self.structures)
            if not case.prescription_gy > 0:
                raise FlaxdoseError(f"case {case.case_id!r} has no prescription; set prescription_gy to predict Gy")
            by_shape.setdefault(case.shape, []).append(i)
        bar = tqdm(total=len(cases), desc=f"predict {self.name}", unit="case", disable=not progress)
        for indices in by_shape.values():
            for chunk in range(0, len(indices), batch_size):
                members = indices[chunk : chunk + batch_size]
                inputs = np.stack([np.moveaxis(cases[i].masks, 0, -1) for i in members]).astype(np.uint8)
                pad = batch_size - len(members)  # keep one batch shape: one compilation per grid size
                if pad:
                    inputs = np.concatenate([inputs, np.zeros((pad, *inputs.shape[1:]), np.uint8)])
                relative = np.asarray(self._predict(self.params, inputs))
                for row, i in enumerate(members):
                    dose = np.clip(relative[row], 0.0, None) * cases[i].prescription_gy
                    out[i] = cases[i].replace(dose=dose.astype(np.float32), meta={**cases[i].meta, "predicted_by": self.name})
                bar.update(len(members))
        bar.close()
        return [out[i] for i in range(len(cases))]


def predict_dataset(model: Model, data: str | Path, split: str, out: str | Path, batch_size: int = 1,
                    overwrite: bool = False) -> Dataset:
    check_writable(out, overwrite)
    dataset = Dataset.open(data)
    ids = dataset.split(split)
    if not ids:
        raise FlaxdoseError(f"split {split!r} of {dataset.root} is empty; nothing to predict")
    predictions = model.predict([dataset.load(i) for i in ids], batch_size=batch_size, progress=True)
    return write_dataset(out, predictions, {split: ids}, overwrite=overwrite,
                         extra={"predicted_by": str(model.name), "source_dataset": str(Path(data).resolve())})


# ---------------------------------------------------------------- CLI
def define_flags() -> None:
    """CLI flags, defined only when run as a program so other modules can import this one."""
    flags.DEFINE_string("workdir", None, "training workdir to load the model from (best checkpoint)")
    flags.DEFINE_string("checkpoint", None, "a checkpoint path instead of --workdir")
    flags.DEFINE_string("data", None, "dataset folder (with manifest.json)")
    flags.DEFINE_string("split", "test", "which split to predict")
    flags.DEFINE_string("out", None, "output dataset folder for the predicted cases")
    flags.DEFINE_integer("batch_size", 1, "volumes per forward pass")
    flags.DEFINE_bool("overwrite", False, "replace an existing --out folder")


FLAGS = flags.FLAGS


def main(argv):
    del argv
    if not (FLAGS.workdir or FLAGS.checkpoint) or not FLAGS.data or not FLAGS.out:
        raise FlaxdoseError("usage: python -m flaxdose.predict --workdir W (or --checkpoint C) --data DIR --out OUT")
    model = Model.load(FLAGS.checkpoint or FLAGS.workdir)
    result = predict_dataset(model, FLAGS.data, FLAGS.split, FLAGS.out, FLAGS.batch_size, FLAGS.overwrite)
    print(json.dumps({"predicted": len(result.split(FLAGS.split)), "out": str(result.root)}))


if __name__ == "__main__":
    define_flags()
    cli.run(main)
