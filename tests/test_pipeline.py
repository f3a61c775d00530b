import numpy as np
import pytest

from flaxdose.data import PROSTATE_STRUCTURES, Case, pipeline, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.synthetic.phantom import phantom_cases

DISTANCE = pipeline.InputSpec(PROSTATE_STRUCTURES, target_distance=True)  # the masks + the union distance


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    cases = phantom_cases(3, 4, shape=(24, 20, 12))
    return write_dataset(tmp_path_factory.mktemp("d") / "ds", cases, {"train": [c.case_id for c in cases]})


def make(dataset, seed=0, flip_lr=True, batch_size=2, patch=(8, 8, 4)):
    source = pipeline.CaseSource(dataset, dataset.split("train"), PROSTATE_STRUCTURES)
    return pipeline.patch_dataset(
        source, patch_shape=patch, sigma=(3.0, 3.0, 2.0), batch_size=batch_size, seed=seed,
        structures=PROSTATE_STRUCTURES, flip_lr=flip_lr,
    )


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batches_are_deterministic_by_seed(dataset):
    a = take(pipeline.make_iterator(make(dataset, seed=1)), 4)
    b = take(pipeline.make_iterator(make(dataset, seed=1)), 4)
    c = take(pipeline.make_iterator(make(dataset, seed=2)), 4)
    assert a[0]["inputs"].shape == (2, 8, 8, 4, 6) and a[0]["inputs"].dtype == np.uint8
    assert a[0]["target"].shape == (2, 8, 8, 4) and a[0]["target"].dtype == np.float32
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["target"], y["target"])
    assert any(not np.array_equal(x["target"], z["target"]) for x, z in zip(a, c))


def test_iterator_resumes_exactly_from_its_state(dataset):
    it = pipeline.make_iterator(make(dataset))
    take(it, 3)
    state = it.get_state()
    expected = take(it, 3)
    resumed = pipeline.make_iterator(make(dataset))
    resumed.set_state(state)
    for x, y in zip(expected, take(resumed, 3)):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])
        np.testing.assert_array_equal(x["target"], y["target"])


def test_worker_processes_give_the_same_batches(dataset):
    plain = take(pipeline.make_iterator(make(dataset)), 2)
    it = pipeline.make_iterator(make(dataset), workers=2)
    try:
        for x, y in zip(plain, take(it, 2)):
            np.testing.assert_array_equal(x["target"], y["target"])
    finally:
        it.close()


def test_patch_centres_follow_the_ptv_and_stay_inside():
    shape = (30, 30, 20)
    element = {"inputs": np.zeros((*shape, 6), np.uint8), "target": np.zeros(shape, np.float32),
               "centroid": np.array([3.0, 15.0, 10.0], np.float32)}
    element["target"][:] = np.arange(shape[0])[:, None, None]  # target value = x index
    sampler = pipeline.PatchSampler((8, 8, 8), (2.0, 2.0, 2.0))
    rng = np.random.default_rng(0)
    starts = [sampler.random_map(element, rng)["target"][0, 0, 0] for _ in range(200)]
    assert min(starts) == 0  # clipped at the volume edge, never negative
    sampler = pipeline.PatchSampler((8, 8, 8), (2.0, 2.0, 2.0))
    element["centroid"] = np.array([15.0, 15.0, 10.0], np.float32)
    centres = np.array([sampler.random_map(element, rng)["target"][0, 0, 0] + 4 for _ in range(400)])
    assert abs(centres.mean() - 15) < 0.5 and 1.2 < centres.std() < 2.8


def test_left_right_flip_swaps_femoral_heads():
    shape = (12, 6, 4)
    masks = np.zeros((6, *shape), bool)
    masks[3, 9:, 2:4, 1:3] = True  # Femur_Head_L on the patient's left (+x)
    masks[5] = True
    dose = np.tile(np.arange(12, dtype=np.float32)[:, None, None], (1, *shape[1:]))
    case = Case("c", PROSTATE_STRUCTURES, masks, dose, (1, 1, 1), prescription_gy=1.0)
    element = pipeline.case_to_example(case)
    perm = pipeline.lr_swap_permutation(PROSTATE_STRUCTURES)
    sampler = pipeline.PatchSampler(shape, (0.0, 0.0, 0.0), flip_lr=True, swap_channels=perm)
    outs = [sampler.random_map(element, np.random.default_rng(s)) for s in range(8)]
    flipped = [o for o in outs if o["target"][0, 0, 0] == 11]
    assert flipped and len(flipped) < len(outs)
    left, right = flipped[0]["inputs"][..., 3], flipped[0]["inputs"][..., 4]
    assert left.sum() == 0 and right[:3].sum() == masks[3].sum()  # the head moved to the right side


def test_patch_larger_than_volume_is_refused(dataset, tmp_path):
    with pytest.raises(FlaxdoseError, match="does not fit"):
        make(dataset, patch=(64, 8, 4))
    with pytest.raises(FlaxdoseError, match="three positive sizes"):
        make(dataset, patch=(8, 0, 4))
    # a later, smaller case is checked too (not only the first one)
    mixed = phantom_cases(3, 2, shape=(24, 20, 12)) + [phantom_cases(4, 1, shape=(24, 20, 6))[0].replace(case_id="small")]
    mixed_ds = write_dataset(tmp_path / "mixed", mixed, {"train": [c.case_id for c in mixed]})
    with pytest.raises(FlaxdoseError, match="case 'small' of grid \\(24, 20, 6\\)"):
        make(mixed_ds, patch=(8, 8, 8))


def test_target_distance_channel_is_the_signed_distance_in_mm_by_hand():
    shape = (12, 10, 6)
    masks = np.zeros((6, *shape), bool)
    masks[0, 4:7, 3:6, 2:4] = True  # PTV: x 4..6, y 3..5, z 2..3
    masks[5] = True
    case = Case("c", PROSTATE_STRUCTURES, masks, np.zeros(shape, np.float32), (4.0, 2.0, 3.0), prescription_gy=70.0)
    d = pipeline.target_distance(case)
    scale = pipeline.DISTANCE_SCALE_MM
    assert d[10, 4, 2] == pytest.approx(4 * 4.0 / scale)  # 4 voxels of 4 mm past the PTV's last x voxel
    assert d[5, 4, 0] == pytest.approx(2 * 3.0 / scale)  # 2 slices of 3 mm below it
    assert d[8, 7, 2] == pytest.approx(np.hypot(2 * 4.0, 2 * 2.0) / scale)  # diagonal in x-y
    assert d[5, 4, 2] == pytest.approx(-3.0 / scale)  # inside: 1 slice of 3 mm (z) to the nearest voxel outside
    assert d[0, 0, 0] == pytest.approx(min(np.sqrt(16**2 + 6**2 + 6**2), 4.0 * scale) / scale)
    inputs = pipeline.model_inputs(case, DISTANCE)
    assert inputs.shape == (*shape, 7) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[..., :6], np.moveaxis(masks, 0, -1))
    assert pipeline.model_inputs(case).dtype == np.uint8 and pipeline.model_inputs(case).shape == (*shape, 6)
    far = Case("far", PROSTATE_STRUCTURES, np.pad(masks, ((0, 0), (0, 100), (0, 0), (0, 0))),
               np.zeros((112, 10, 6), np.float32), (4.0, 2.0, 3.0), prescription_gy=70.0)
    assert pipeline.target_distance(far).max() == pytest.approx(pipeline.DISTANCE_RANGE[1])  # clipped at 200 mm
    empty = masks.copy()
    empty[0] = False
    with pytest.raises(FlaxdoseError, match="no target voxels"):
        pipeline.model_inputs(Case("e", PROSTATE_STRUCTURES, empty, None, (4.0, 2.0, 3.0)), DISTANCE)


def test_mirrored_case_has_the_mirrored_distance_inputs():
    """Flipping x and swapping the femoral heads of the inputs equals the inputs of the mirrored case."""
    case = phantom_cases(5, 1, shape=(20, 16, 8))[0]
    perm = pipeline.lr_swap_permutation(DISTANCE)
    assert perm[-1] == 6 and len(perm) == 7
    fl, fr = PROSTATE_STRUCTURES.index("Femur_Head_L"), PROSTATE_STRUCTURES.index("Femur_Head_R")
    masks = case.masks[:, ::-1].copy()
    masks[[fl, fr]] = masks[[fr, fl]]
    mirrored = case.replace(masks=masks)
    flipped = pipeline.model_inputs(case, DISTANCE)[::-1][..., list(perm)]
    np.testing.assert_allclose(flipped, pipeline.model_inputs(mirrored, DISTANCE), atol=1e-6)
