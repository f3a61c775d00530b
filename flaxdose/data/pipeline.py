"""grain input pipeline: random-access cases -> Gaussian-sampled patches -> flips -> batches.

Each element is ``{"inputs": (X, Y, Z, C) model inputs (see `model_inputs`), "target":
float32 (X, Y, Z) dose / prescription}``; batches add a leading batch axis. Masks alone stay
uint8 until the device (4x less host-to-device traffic). Randomness comes from grain's per-record seeds, so the same
seed gives the same batches and the iterator state can be checkpointed and restored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np
from absl import flags
from scipy import ndimage

from flaxdose.data.case import Case, Dataset, target_names
from flaxdose.errors import FlaxdoseError

# Channels exchanged by a left-right flip (paired organs swap sides).
LR_PAIRS = (("Femur_Head_L", "Femur_Head_R"), ("LeftParotid", "RightParotid"))


# The target-distance channels: signed distance / DISTANCE_SCALE_MM, clipped to DISTANCE_RANGE
# (25 mm deep inside a target .. 200 mm outside it: beyond, a prostate plan's dose is flat).
DISTANCE_SCALE_MM = 50.0
DISTANCE_RANGE = (-0.5, 4.0)
# The CT channel: HU clipped to CT_HU_RANGE, / CT_SCALE_HU (air -1, water 0, bone ~1: the scale of the other
# channels; above 2000 HU is only metal and its streaks, which would otherwise dominate the channel).
CT_HU_RANGE = (-1000.0, 2000.0)
CT_SCALE_HU = 1000.0

PER_TARGET = "per_target"  # data.target_distance: one distance channel per target


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """The channels a model takes, in one place: (X, Y, Z, C) channels-last, in this order:

    - one mask per structure of `structures` (their order; 1 inside, 0 outside);
    - `target_distance` (``data.target_distance``): False, no distance channel; True, one, the signed
      distance to the union of the targets (`target_distance`); "per_target", one per target among
      `structures` (names starting PTV, their order; `per_target_distances`);
    - `include_ct` (``data.include_ct``): the CT (`ct_channel`).

    Build it from a run config with `from_config`; `channels` is C (what ``model.in_channels`` must be).
    Raises FlaxdoseError for another `target_distance` value, or "per_target" without a target among `structures`.
    """

    structures: tuple[str, ...]
    target_distance: bool | str = False
    include_ct: bool = False

    def __post_init__(self):
        object.__setattr__(self, "structures", tuple(str(s) for s in self.structures))
        mode = self.target_distance
        if isinstance(mode, (bool, np.bool_)):
            mode = bool(mode)
        elif mode != PER_TARGET:
            raise FlaxdoseError(f"data.target_distance={mode!r}; choose False (the masks only), True (one channel: the "
                                f"distance to the union of the targets) or {PER_TARGET!r} (one per target)")
        object.__setattr__(self, "target_distance", mode)
        if not isinstance(self.include_ct, (bool, np.bool_)):
            raise FlaxdoseError(f"data.include_ct={self.include_ct!r}; give True or False")
        object.__setattr__(self, "include_ct", bool(self.include_ct))
        if mode == PER_TARGET and not self.targets:
            raise FlaxdoseError(f"data.target_distance={PER_TARGET!r} but data.structures {list(self.structures)} "
                                "holds no target (a name starting PTV); add the targets or set it to False")

    @classmethod
    def from_config(cls, config) -> InputSpec:
        """The inputs of a run config (or a package's): ``data.structures``, ``data.target_distance`` (default
        False) and ``data.include_ct`` (default False: configs and runs from before it)."""
        data = config.data
        return cls(tuple(data.structures), data.get("target_distance", False), data.get("include_ct", False))

    @classmethod
    def of(cls, inputs: InputSpec | Sequence[str]) -> InputSpec:
        """`inputs` as an InputSpec: an InputSpec as it is, a sequence of structure names as those masks only."""
        return inputs if isinstance(inputs, InputSpec) else cls(tuple(inputs))

    @property
    def targets(self) -> tuple[str, ...]:
        """The targets among `structures` (`flaxdose.data.case.target_names`)."""
        return target_names(self.structures)

    @property
    def distance_channels(self) -> int:
        """How many distance channels: 0, 1 (the union) or one per target."""
        return len(self.targets) if self.target_distance == PER_TARGET else int(self.target_distance)

    @property
    def channels(self) -> int:
        """C of `model_inputs`: structures + distance channels + the CT (what ``model.in_channels`` must be)."""
        return len(self.structures) + self.distance_channels + int(self.include_ct)

    def describe(self) -> str:
        """The channels in words, for messages: "6 structure masks + 1 target-distance channel + the CT"."""
        parts = [f"{len(self.structures)} structure masks"]
        if self.distance_channels:
            kind = "per-target distance" if self.target_distance == PER_TARGET else "target-distance"
            parts.append(f"{self.distance_channels} {kind} channel{'s' if self.distance_channels > 1 else ''}")
        if self.include_ct:
            parts.append("the CT")
        return " + ".join(parts)

    def channel_names(self) -> list[str]:
        """One description per channel, in order (a model package's ``inputs.channels``)."""
        clip = (f"mm / {DISTANCE_SCALE_MM:g}, clipped to [{DISTANCE_RANGE[0]:g}, {DISTANCE_RANGE[1]:g}] "
                "(negative inside)")
        names = [f"{s} mask (1 inside, 0 outside)" for s in self.structures]
        if self.target_distance == PER_TARGET:
            names += [f"signed distance to {t}, {clip}; {DISTANCE_RANGE[1]:g} where the case has no {t}"
                      for t in self.targets]
        elif self.target_distance:
            names.append(f"signed distance to the union of the targets (PTV...), {clip}")
        if self.include_ct:
            names.append(f"CT in HU clipped to [{CT_HU_RANGE[0]:g}, {CT_HU_RANGE[1]:g}], / {CT_SCALE_HU:g}")
        return names

    def config_values(self) -> dict:
        """``{"target_distance", "include_ct"}`` as a run config's ``data`` holds them."""
        return {"target_distance": self.target_distance, "include_ct": self.include_ct}

    def lr_swap_permutation(self) -> tuple[int, ...]:
        """Channel permutation of `model_inputs` for a left-right flip: the identity with each `LR_PAIRS`
        pair present swapped (distance and CT channels, scalar fields of the whole volume, map to themselves)."""
        perm = list(range(self.channels))
        for left, right in LR_PAIRS:
            if left in self.structures and right in self.structures:
                i, j = self.structures.index(left), self.structures.index(right)
                perm[i], perm[j] = j, i
        return tuple(perm)


def check_in_channels(inputs: InputSpec, in_channels: int, where: str = "") -> None:
    """Raise FlaxdoseError unless a model of ``model.in_channels`` = `in_channels` takes `inputs`' channels
    (`where`: what to name before the problem, e.g. a package; the fix names the right value)."""
    if inputs.channels != in_channels:
        raise FlaxdoseError(f"{where}the inputs ({inputs.describe()}) are {inputs.channels} channels but "
                            f"model.in_channels is {in_channels}; set --config.model.in_channels={inputs.channels}")


def signed_distance_mm(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance (mm) to a non-empty bool mask, > 0 outside, < 0 inside: outside, to the
    nearest mask voxel; inside, minus the distance to the nearest voxel outside (voxel centres,
    `scipy.ndimage.distance_transform_edt` with the grid's spacing)."""
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    return np.where(mask, -inside, outside)


def _scaled_distance(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """float32 `signed_distance_mm` / DISTANCE_SCALE_MM, clipped to DISTANCE_RANGE."""
    d = signed_distance_mm(mask, spacing_mm) / DISTANCE_SCALE_MM
    return np.clip(d, *DISTANCE_RANGE).astype(np.float32)


def target_distance(case: Case) -> np.ndarray:
    """float32 (X, Y, Z): the signed distance to the union of the case's targets (PTV...), in units of
    DISTANCE_SCALE_MM, clipped to DISTANCE_RANGE. Raises FlaxdoseError when every target is empty."""
    union = np.any([case.mask(t) for t in case.targets], axis=0) if case.targets else np.zeros(case.shape, bool)
    if not union.any():
        raise FlaxdoseError(f"case {case.case_id!r} has no target voxels (structures named PTV...); the "
                            "target-distance input (data.target_distance) needs a contoured target")
    return _scaled_distance(union, case.spacing_mm)


def per_target_distances(case: Case, targets: Sequence[str]) -> np.ndarray:
    """float32 (X, Y, Z, T): per target of `targets` (in that order) the signed distance to it, scaled and
    clipped as `target_distance`. A target the case leaves empty (an OpenKBP patient without PTV56) gets
    the constant DISTANCE_RANGE[1] (4.0: "far from this target") rather than an error. Raises
    FlaxdoseError when the case lacks a structure of `targets`."""
    channels = []
    for name in targets:
        mask = case.mask(name)
        channels.append(_scaled_distance(mask, case.spacing_mm) if mask.any()
                        else np.full(case.shape, DISTANCE_RANGE[1], np.float32))
    return np.stack(channels, axis=-1) if channels else np.zeros((*case.shape, 0), np.float32)


def no_ct_error(what: str, model: str = "the model") -> FlaxdoseError:
    """The error for a case (named by `what`) without a CT that `model` needs as an input, with the fixes."""
    return FlaxdoseError(
        f"{what} has no CT, but {model} takes the CT as an input (data.include_ct): re-import the plan with "
        "`python -m flaxdose.import_dicom --include_ct` (OpenKBP: convert the patients with their CT, without "
        "--noinclude_ct), or leave the cases without a CT out (flaxdose.data.pipeline.cases_with_ct)")


def ct_channel(case: Case) -> np.ndarray:
    """float32 (X, Y, Z): the case's CT in HU clipped to CT_HU_RANGE, / CT_SCALE_HU (-1 .. 2). Raises
    FlaxdoseError, naming the case and the fix, for a case without a CT."""
    if case.ct is None:
        raise no_ct_error(f"case {case.case_id!r}")
    return (np.clip(case.ct, *CT_HU_RANGE) / CT_SCALE_HU).astype(np.float32)


def model_inputs(case: Case, inputs: InputSpec | None = None) -> np.ndarray:
    """(X, Y, Z, C) channels-last model inputs of a case: the channels of `inputs` (an `InputSpec`, whose
    structures the case must have in that order; None: the case's own masks only). Masks alone stay uint8
    (C = S); with a distance or CT channel all are float32. The masks are the paper's inputs; the distance
    hands the network the geometry a dose fall-off follows, which a small network at 8 mm learns slowly
    (docs/results/paper_study_cpu.md). Raises FlaxdoseError for other structures, no target voxels (the
    union distance), or no CT (`include_ct`)."""
    if inputs is None:
        inputs = InputSpec(case.structures)
    case.check_structures(inputs.structures)
    masks = np.moveaxis(case.masks, 0, -1)
    extra = []
    if inputs.target_distance == PER_TARGET:
        extra.append(per_target_distances(case, inputs.targets))
    elif inputs.target_distance:
        extra.append(target_distance(case)[..., None])
    if inputs.include_ct:
        extra.append(ct_channel(case)[..., None])
    if not extra:
        return masks.astype(np.uint8)
    return np.concatenate([masks.astype(np.float32), *extra], axis=-1)


def cases_with_ct(dataset: Dataset, case_ids: Sequence[str]) -> list[str]:
    """The ids among `case_ids` (in their order) whose case stores a CT, read without loading the volumes: the
    cases a model with ``data.include_ct`` can train on or predict. Raises FlaxdoseError for an unreadable case."""
    return [case_id for case_id in case_ids if dataset.has_ct(case_id)]


def require_inputs(dataset: Dataset, case_ids: Sequence[str], inputs: InputSpec, what: str = "cases") -> None:
    """Raise FlaxdoseError, before any volume is read, when `inputs` takes the CT and some of `case_ids` have
    none (naming them and the fixes, as `ct_channel`); nothing to check otherwise."""
    if not inputs.include_ct:
        return
    missing = [i for i in case_ids if not dataset.has_ct(i)]
    if missing:
        shown = ", ".join(repr(i) for i in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FlaxdoseError(
            f"{len(missing)} of the {len(case_ids)} {what} of {dataset.root} have no CT ({shown}), but the model "
            "takes the CT as an input (data.include_ct): re-import them with `python -m flaxdose.import_dicom "
            "--include_ct` (OpenKBP: convert without --noinclude_ct), leave them out (the ids of "
            "flaxdose.data.pipeline.cases_with_ct, e.g. as --config.data.train_cases), or set data.include_ct=False")


def case_to_example(case: Case, inputs: InputSpec | None = None) -> dict[str, np.ndarray]:
    """One case as a training example: {"inputs", "target", "centroid"}.

    inputs: `model_inputs` (X, Y, Z, C) of `inputs` (None: the case's masks); target: float32 (X, Y, Z)
    dose / prescription_gy (1.0 = the prescription); centroid: see `target_centroid`. Raises FlaxdoseError
    for a case without dose or without a positive prescription (or one `model_inputs` refuses).
    """
    if case.dose is None:
        raise FlaxdoseError(f"case {case.case_id!r} has no dose; training and evaluation need one")
    if not case.prescription_gy > 0:
        raise FlaxdoseError(f"case {case.case_id!r} has no prescription; set prescription_gy")
    return {
        "inputs": model_inputs(case, inputs),
        "target": (case.dose / case.prescription_gy).astype(np.float32),
        "centroid": target_centroid(case),
    }


def target_centroid(case: Case) -> np.ndarray:
    """float32 (3,): voxel-index (x, y, z) centroid of all targets (structures named PTV...), else the volume centre."""
    targets = [case.mask(name) for name in case.targets]
    union = np.any(targets, axis=0) if targets else np.zeros(case.shape, bool)
    return (np.argwhere(union).mean(axis=0) if union.any() else np.array(case.shape) / 2).astype(np.float32)


class CaseSource(grain.sources.RandomAccessDataSource):
    """Random access over the cases of a dataset split, each checked against the model's inputs.

    `inputs`: the model's `InputSpec` (a sequence of structure names: those masks only). Items are
    `case_to_example` dicts, cached in memory after the first read unless `cache=False`. Raises
    FlaxdoseError for an empty `case_ids` or, with ``include_ct``, cases without a CT (`require_inputs`);
    reading a case raises it for a missing or damaged file, other structures, or no dose / prescription.
    """

    def __init__(self, dataset: Dataset, case_ids: Sequence[str], inputs: InputSpec | Sequence[str],
                 cache: bool = True):
        if not case_ids:
            raise FlaxdoseError(f"no cases to read from {dataset.root}; check the dataset's splits")
        self.inputs = InputSpec.of(inputs)
        require_inputs(dataset, case_ids, self.inputs, "training cases")
        self._dataset, self._ids = dataset, list(case_ids)
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        example = case_to_example(self._dataset.load(self._ids[index]), self.inputs)
        if self._cache is not None:
            self._cache[index] = example
        return example

    def shapes(self) -> dict[str, tuple[int, int, int]]:
        """case id -> grid (X, Y, Z) voxels of every case, read without loading the volumes."""
        return {case_id: self._dataset.case_shape(case_id) for case_id in self._ids}

    def __repr__(self) -> str:  # grain logs this; keep it short
        return f"CaseSource({self._dataset.root}, {len(self)} cases)"


@dataclasses.dataclass(frozen=True)
class PatchSampler(grain.transforms.RandomMap):
    """Crop a patch whose centre is drawn from a Gaussian around the PTV centroid.

    `patch_shape` (X, Y, Z) and `sigma` are per axis in voxels; centres are clipped so the
    patch lies inside the volume. With `flip_lr`, half of the patches are mirrored along x
    (the patient's left-right axis) with the channels permuted by `swap_channels` (see
    `lr_swap_permutation`; required with `flip_lr`).
    """

    patch_shape: tuple[int, int, int]
    sigma: tuple[float, float, float]
    flip_lr: bool = False
    swap_channels: tuple[int, ...] | None = None  # channel permutation applied on a flip

    def random_map(self, element, rng: np.random.Generator):
        """`case_to_example` dict -> {"inputs": (*patch_shape, C) model inputs, "target": float32 patch_shape}."""
        shape = element["target"].shape
        centre = rng.normal(element["centroid"], self.sigma)
        start = [
            int(np.clip(np.round(c - p / 2), 0, n - p)) for c, p, n in zip(centre, self.patch_shape, shape)
        ]
        window = tuple(slice(s, s + p) for s, p in zip(start, self.patch_shape))
        inputs, target = element["inputs"][window], element["target"][window]
        if self.flip_lr and rng.random() < 0.5:
            inputs, target = inputs[::-1][..., list(self.swap_channels)], target[::-1]
        return {"inputs": np.ascontiguousarray(inputs), "target": np.ascontiguousarray(target)}


def lr_swap_permutation(inputs: InputSpec | Sequence[str]) -> tuple[int, ...]:
    """`InputSpec.lr_swap_permutation` of `inputs` (a sequence of structure names: those masks only)."""
    return InputSpec.of(inputs).lr_swap_permutation()


def check_patch_fits(patch_shape: Sequence[int], volume_shape: Sequence[int], where: str = "the volumes") -> None:
    """Raise FlaxdoseError unless `patch_shape` has 3 positive sizes, each at most `volume_shape`'s (X, Y, Z voxels)."""
    if len(patch_shape) != 3 or any(p < 1 for p in patch_shape) or any(p > n for p, n in zip(patch_shape, volume_shape)):
        raise FlaxdoseError(
            f"patch shape {tuple(patch_shape)} does not fit {where} {tuple(volume_shape)}; "
            "set data.patch_shape to three positive sizes, at most the grid size"
        )


def patch_dataset(
    source: CaseSource,
    *,
    patch_shape: Sequence[int],
    sigma: Sequence[float],
    batch_size: int,
    seed: int,
    structures: Sequence[str] | None = None,
    flip_lr: bool = True,
) -> grain.MapDataset:
    """An endless, shuffled, batched MapDataset of training patches.

    Batches: {"inputs": (batch_size, X, Y, Z, C) `model_inputs`, "target": float32 (batch_size, X, Y, Z)}
    with (X, Y, Z) = `patch_shape`; `sigma` in voxels (see `PatchSampler`). The same `seed`
    gives the same batches; the channels and their flip permutation are `source.inputs`' (`structures`, if
    given, must be its structures). Raises FlaxdoseError when the patch does not fit every case's grid.
    """
    if structures is not None and tuple(structures) != source.inputs.structures:
        raise FlaxdoseError(f"patch_dataset: structures {list(structures)} differ from the source's "
                            f"{list(source.inputs.structures)}; pass the same list (or leave structures out)")
    for case_id, shape in source.shapes().items():
        check_patch_fits(patch_shape, shape, f"case {case_id!r} of grid")
    sampler = PatchSampler(
        tuple(int(p) for p in patch_shape),
        tuple(float(s) for s in sigma),
        flip_lr,
        source.inputs.lr_swap_permutation(),
    )
    return (
        grain.MapDataset.source(source)
        .seed(seed)
        .shuffle()
        .repeat()
        .random_map(sampler)
        .batch(batch_size, drop_remainder=True)
    )


def make_iterator(ds: grain.MapDataset, workers: int = 0, prefetch: int = 2):
    """A checkpointable iterator (`get_state`/`set_state`) over `ds`; `workers` > 0 reads in that many
    worker processes, and `prefetch` is the read threads and buffered elements."""
    iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, prefetch), prefetch_buffer_size=prefetch))
    if workers > 0:
        if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
            flags.FLAGS.mark_as_parsed()
        iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return iter(iter_ds)
