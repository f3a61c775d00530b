"""The resume policy: which config may start again in a workdir that holds checkpoints (`check_resume`).

A run resumes with the model and the optimisation settings its checkpoints were trained with
(`OPTIMISATION_SETTINGS`); a finished run extends to more steps; anything else is refused before
anything is written, naming the settings that resume it.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path

from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError
from flaxdose.io import require_folder
from flaxdose.model import COMPUTE_ONLY
from flaxdose.run import Run
from flaxdose.training import optim, transfer

log = logging.getLogger("flaxdose")


# The settings that shape a run's optimisation: changed between a checkpoint and its resumption,
# they change the learning-rate schedule (`optim.schedule_factor` is a function of steps, warmup
# and decay), the loss or the rate mid-run, or the patches it draws (the seed picks them; the
# resumed iterator state would no longer be the run's).
OPTIMISATION_SETTINGS = ("train.steps", "train.batch_size", "train.learning_rate", "train.schedule",
                         "train.warmup_steps", "train.decay_steps", "train.end_lr_fraction", "train.target_weight",
                         "transfer.mode", "transfer.learning_rate",
                         "seed", "data.flip_lr", "data.patch_shape", "data.patch_sigma")
_UNUSED_BY_SCHEDULE = {"constant": {"train.warmup_steps", "train.decay_steps", "train.end_lr_fraction"},
                       "warmup_cosine": {"train.decay_steps"}}


def optimisation_settings(config) -> dict:
    """{"train.steps": ..., ...}: the `OPTIMISATION_SETTINGS` of `config` as its run uses them: after
    `optim.fit_schedule` (a short run's warmup and decay are fitted to it, as `train_and_evaluate`
    trains and stores them), without those the run ignores (a schedule's unused settings, the
    learning rate of the mode not trained: ``train.*`` for transfer, ``transfer.*`` else); absent
    settings are None."""
    values = json.loads(config_lib.to_json(optim.fit_schedule(config)))
    unused = set(_UNUSED_BY_SCHEDULE.get(values.get("train", {}).get("schedule", "constant"), ()))
    unused.add("train.learning_rate" if transfer.is_transfer(config) else "transfer.learning_rate")
    return {key: _dotted(values, key) for key in OPTIMISATION_SETTINGS if key not in unused}


def _flag(key: str, value) -> str:
    """The command-line flag that sets `key` to `value`, quoted for a shell: ``'--config.data.patch_shape=(32,32,16)'``."""
    if isinstance(value, (list, tuple)):
        value = "(" + ",".join(map(str, value)) + ")"
    return shlex.quote(f"--config.{key}={value}")


def _shown(settings: dict, key: str) -> str:
    """A setting of `optimisation_settings` for a message: its value, or "not used" (by that run's schedule or mode)."""
    return repr(settings[key]) if key in settings else "not used"


def _dotted(values: dict, key: str):
    """``values["data"]["flip_lr"]`` for "data.flip_lr" (None where absent)."""
    for part in key.split("."):
        values = values.get(part) if isinstance(values, dict) else None
    return values


def open_run(workdir: str | Path, config) -> Run:
    """The `Run` of `config` in `workdir` once `check_resume` accepts it (its notes logged)."""
    run = Run(require_folder(workdir, "--workdir").resolve(), config)
    for note in check_resume(run, config):
        log.info("%s", note)
    return run


def check_resume(run: Run, config) -> list[str]:
    """Refuse a workdir that holds checkpoints of a different model or of other optimisation settings,
    before writing anything; returns notes on the changes accepted (to log).

    Settings are compared as the runs use them (`optimisation_settings`), so re-running the same
    command resumes. One change is accepted: another ``train.steps``, (a) for a ``"constant"``
    schedule (extending or shortening a run; nothing else depends on the step count), (b) for a
    finished run on any schedule (extending it: from its last step on it follows the schedule of the
    longer run, warmup and decay as `optim.fit_schedule` fits them to it; `extension_note`), and (c)
    a count at or below the steps already trained (nothing to train). A scheduled run that has not
    finished is refused: its rate would change mid-run. Raises FlaxdoseError naming each difference,
    and the settings that resume the stored run.
    """
    workdir, saved = run.workdir, run.config_file
    if not run.has_checkpoints:
        return []
    old = run.stored_config().to_dict().get("model", {})
    new = json.loads(config_lib.to_json(config))["model"]
    diffs = [f"model.{k}: {old.get(k)!r} there vs {new.get(k)!r} now" for k in sorted(set(old) | set(new))
             if old.get(k) != new.get(k) and k not in COMPUTE_ONLY]
    if diffs:
        raise FlaxdoseError(
            f"workdir {workdir} holds checkpoints of another model ({'; '.join(diffs)}); "
            "use a new --workdir, or the model settings it was trained with"
        )
    done = run.saved_steps()
    if not done:
        return []  # nothing trained yet: nothing to keep consistent
    old_config = run.stored_config()
    old, new = optimisation_settings(old_config), optimisation_settings(config)
    notes = []
    steps = old.get("train.steps"), new.get("train.steps")
    if None not in steps and steps[1] != steps[0]:
        finished = max(done) >= steps[0]
        constant = old.get("train.schedule") == new.get("train.schedule") == "constant"
        if steps[1] <= max(done):  # nothing to train; the checkpoints stay as they are
            notes.append(f"train.steps {steps[0]} -> {steps[1]}: the run in {workdir} has already trained to step "
                         f"{max(done)}; nothing to train (its checkpoints are kept as they are)")
        elif constant:
            notes.append(f"train.steps {steps[0]} -> {steps[1]}: the constant-rate run in {workdir} now ends at step {steps[1]}")
        elif finished and old.get("train.schedule") == new.get("train.schedule"):
            notes.append(extension_note(old_config, config, max(done), workdir))
            for key in _FITTED_TO_STEPS:  # the new length's schedule, as `optim.fit_schedule` fitted it
                if key in new:
                    old[key] = new[key]
        if constant or finished or steps[1] <= max(done):
            old["train.steps"] = steps[1]
    changed = [k for k in OPTIMISATION_SETTINGS if (k in old or k in new) and old.get(k) != new.get(k)]
    if changed:
        stored = " ".join(_flag(k, old[k]) for k in changed if old.get(k) is not None)
        extend = (f"; to train longer, let the run finish at step {old['train.steps']} first: a finished run "
                  "extends with a larger --config.train.steps" if "train.steps" in changed else "")
        raise FlaxdoseError(
            f"workdir {workdir} holds checkpoints trained with other settings "
            f"({'; '.join(f'{k}: {_shown(old, k)} there vs {_shown(new, k)} now' for k in changed)}): resuming would "
            f"change the learning-rate schedule, the loss or the patches drawn mid-run; use a new --workdir, or resume with the stored "
            f"settings ({stored or 'see ' + str(saved)}){extend}"
        )
    return notes


# The schedule settings `optim.fit_schedule` derives from train.steps: an extended run takes the new length's.
_FITTED_TO_STEPS = ("train.warmup_steps", "train.decay_steps")


def extension_note(old_config, config, done: int, workdir: Path) -> str:
    """The log line of a finished run with a scheduled learning rate extended to more steps: from step `done` on
    it follows the schedule of the longer run, so the rate returns from where the run ended to that schedule's."""
    old_steps, new_steps = int(old_config.train.steps), int(config.train.steps)
    ended, resumes = optim.learning_rate(old_config, done), optim.learning_rate(config, done + 1)
    decay = config.train.get("decay_steps") if config.train.get("schedule") == "warmup_stable_decay" else None
    left = new_steps - done
    tail = (", following it to the end" if not decay else f", then decays again over its last {decay} steps"
            if decay < left else f", decaying over the {left} steps left")  # the new end may fall inside the decay
    return (f"train.steps {old_steps} -> {new_steps}: the finished run in {workdir} continues from step {done} on the "
            f"{config.train.schedule} schedule of a {new_steps}-step run: the learning rate goes from {ended:.3g} (where "
            f"it ended) to {resumes:.3g} at step {done + 1}{tail}")
