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
from absl import flags
import numpy as np
from scipy import ndimage

from flaxdose.data.case import Case, Dataset
from flaxdose.errors import FlaxdoseError

# Channels exchanged by a left-right flip (paired organs swap sides).
LR_PAIRS = (("Femur_Head_L", "Femur_Head_R"), ("LeftParotid", "RightParotid"))


# The target-distance channel: signed distance / DISTANCE_SCALE_MM, clipped to DISTANCE_RANGE
# (25 mm deep inside a target .. 200 mm outside it: beyond, a prostate plan's dose is flat).
DISTANCE_SCALE_MM = 50.0
DISTANCE_RANGE = (-0.5, 4.0)


def signed_distance_mm(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance (mm) to a non-empty bool mask, > 0 outside, < 0 inside: outside, to the
    nearest mask voxel; inside, minus the distance to the nearest voxel outside (voxel centres,
    `scipy.ndimage.distance_transform_edt` with the grid's spacing)."""
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing_mm)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing_mm)
    return np.where(mask, -inside, outside)


def target_distance(case: Case) -> np.ndarray:
    """float32 (X, Y, Z): the signed distance to the union of the case's targets (PTV...), in units of
    DISTANCE_SCALE_MM, clipped to DISTANCE_RANGE. Raises FlaxdoseError when every target is empty."""
    union = np.any([case.mask(t) for t in case.targets], axis=0) if case.targets else np.zeros(case.shape, bool)
    if not union.any():
        raise FlaxdoseError(f"case {case.case_id!r} has no target voxels (structures named PTV...); the "
                            "target-distance input (data.target_distance) needs a contoured target")
    d = signed_distance_mm(union, case.spacing_mm) / DISTANCE_SCALE_MM
    return np.clip(d, *DISTANCE_RANGE).astype(np.float32)


def model_inputs(case: Case, with_distance: bool = False) -> np.ndarray:
    """(X, Y, Z, C) channels-last model inputs of a case: its S structure masks (uint8), and with
    `with_distance` (``data.target_distance``) one more channel, `target_distance` (then all float32,
    C = S + 1). The masks are the paper's inputs; the distance hands the network the geometry a
    dose fall-off follows, which a small network at 8 mm learns slowly (docs/results/paper_study_cpu.md)."""
    masks = np.moveaxis(case.masks, 0, -1)
    if not with_distance:
        return masks.astype(np.uint8)
    return np.concatenate([masks.astype(np.float32), target_distance(case)[..., None]], axis=-1)


def input_channels(structures: Sequence[str], with_distance: bool = False) -> int:
    """C of `model_inputs`: one channel per structure, plus the distance channel."""
    return len(structures) + int(bool(with_distance))


def case_to_example(case: Case, with_distance: bool = False) -> dict[str, np.ndarray]:
    """One case as a training example: {"inputs", "target", "centroid"}.

    inputs: `model_inputs` (X, Y, Z, C); target: float32 (X, Y, Z) dose / prescription_gy (1.0 =
    the prescription); centroid: see `target_centroid`. Raises FlaxdoseError for a case without
    dose or without a positive prescription (or, `with_distance`, without target voxels).
    """
    if case.dose is None:
        raise FlaxdoseError(f"case {case.case_id!r} has no dose; training and evaluation need one")
    if not case.prescription_gy > 0:
        raise FlaxdoseError(f"case {case.case_id!r} has no prescription; set prescription_gy")
    return {
        "inputs": model_inputs(case, with_distance),
        "target": (case.dose / case.prescription_gy).astype(np.float32),
        "centroid": target_centroid(case),
    }


def target_centroid(case: Case) -> np.ndarray:
    """float32 (3,): voxel-index (x, y, z) centroid of all targets (structures named PTV...), else the volume centre."""
    targets = [case.mask(name) for name in case.targets]
    union = np.any(targets, axis=0) if targets else np.zeros(case.shape, bool)
    return (np.argwhere(union).mean(axis=0) if union.any() else np.array(case.shape) / 2).astype(np.float32)


class CaseSource(grain.sources.RandomAccessDataSource):
    """Random access over the cases of a dataset split, each checked against the model's structures.

    Items are `case_to_example` dicts, cached in memory after the first read unless
    `cache=False`. Raises FlaxdoseError for an empty `case_ids`; reading a case raises it for a
    missing or damaged file, other structures than `structures`, or no dose / prescription.
    """

    def __init__(self, dataset: Dataset, case_ids: Sequence[str], structures: Sequence[str], cache: bool = True,
                 with_distance: bool = False):
        if not case_ids:
            raise FlaxdoseError(f"no cases to read from {dataset.root}; check the dataset's splits")
        self._dataset, self._ids, self._structures = dataset, list(case_ids), tuple(structures)
        self.with_distance = bool(with_distance)
        self._cache = {} if cache else None

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        case = self._dataset.load(self._ids[index])
        case.check_structures(self._structures)
        example = case_to_example(case, self.with_distance)
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


def lr_swap_permutation(structures: Sequence[str], with_distance: bool = False) -> tuple[int, ...]:
    """Channel permutation of `model_inputs` for a left-right flip: the identity with each `LR_PAIRS`
    pair present swapped (the distance channel, a scalar field, maps to itself)."""
    perm = list(range(input_channels(structures, with_distance)))
    for left, right in LR_PAIRS:
        if left in structures and right in structures:
            i, j = structures.index(left), structures.index(right)
            perm[i], perm[j] = j, i
    return tuple(perm)


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
    structures: Sequence[str],
    flip_lr: bool = True,
) -> grain.MapDataset:
    """An endless, shuffled, batched MapDataset of training patches.

    Batches: {"inputs": (batch_size, X, Y, Z, C) `model_inputs`, "target": float32 (batch_size, X, Y, Z)}
    with (X, Y, Z) = `patch_shape`; `sigma` in voxels (see `PatchSampler`). The same `seed`
    gives the same batches. Raises FlaxdoseError when the patch does not fit every case's grid.
    """
    for case_id, shape in source.shapes().items():
        check_patch_fits(patch_shape, shape, f"case {case_id!r} of grid")
    sampler = PatchSampler(
        tuple(int(p) for p in patch_shape),
        tuple(float(s) for s in sigma),
        flip_lr,
        lr_swap_permutation(tuple(structures), source.with_distance),
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
