"""The optional model inputs beyond the masks: per-target distance channels and the CT (`InputSpec`)."""

import json
import shutil

import numpy as np
import pytest

from flaxdose import config as config_lib
from flaxdose.data import PROSTATE_STRUCTURES, Case, pipeline, write_dataset
from flaxdose.data.pipeline import InputSpec, model_inputs
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import Model, package
from flaxdose.model import UNetSpec
from flaxdose.synthetic.phantom import phantom_cases
from flaxdose.training import trainer

TWO_TARGETS = ("PTV70", "Bladder", "PTV56")


def single_voxel_case(spacing=(40.0, 3.0, 4.0), ct=None, empty_56=False):
    """A (7, 6, 5) grid: PTV70 one voxel at (1, 2, 3), PTV56 one voxel at (5, 1, 0) (or none), a bladder box."""
    masks = np.zeros((3, 7, 6, 5), bool)
    masks[0, 1, 2, 3] = True
    masks[1, 3:5, 3:6, 1:3] = True
    if not empty_56:
        masks[2, 5, 1, 0] = True
    return Case("c", TWO_TARGETS, masks, np.zeros((7, 6, 5), np.float32), spacing, prescription_gy=70.0, ct=ct)


def distance_by_hand(voxel, shape, spacing):
    """The signed distance (in DISTANCE_SCALE_MM, clipped) to one voxel: Euclidean between voxel centres outside,
    minus the smallest spacing (the nearest voxel outside) on it."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    d = np.sqrt((((grid - np.array(voxel)) * np.array(spacing)) ** 2).sum(-1))
    d[tuple(voxel)] = -min(spacing)
    return np.clip(d / pipeline.DISTANCE_SCALE_MM, *pipeline.DISTANCE_RANGE)


def test_per_target_distance_is_one_channel_per_target_in_structure_order_by_hand():
    case = single_voxel_case()
    spec = InputSpec(TWO_TARGETS, target_distance="per_target")
    assert spec.targets == ("PTV70", "PTV56") and spec.distance_channels == 2 and spec.channels == 5
    inputs = model_inputs(case, spec)
    assert inputs.shape == (7, 6, 5, 5) and inputs.dtype == np.float32
    np.testing.assert_array_equal(inputs[..., :3], np.moveaxis(case.masks, 0, -1))  # masks first, their order
    np.testing.assert_allclose(inputs[..., 3], distance_by_hand((1, 2, 3), case.shape, case.spacing_mm), atol=1e-6)
    np.testing.assert_allclose(inputs[..., 4], distance_by_hand((5, 1, 0), case.shape, case.spacing_mm), atol=1e-6)
    assert inputs[..., 3].max() == pytest.approx(pipeline.DISTANCE_RANGE[1])  # 5 x 40 mm > 200 mm: clipped
    assert inputs[1, 2, 3, 3] == pytest.approx(-3.0 / pipeline.DISTANCE_SCALE_MM)  # inside: -(smallest step, 3 mm)
    # True keeps meaning one channel, the distance to the union, as before
    union = model_inputs(case, InputSpec(TWO_TARGETS, target_distance=True))
    assert union.shape[-1] == 4
    np.testing.assert_allclose(union[..., 3], np.minimum(inputs[..., 3], inputs[..., 4]), atol=1e-6)
    np.testing.assert_array_equal(union[..., 3], pipeline.target_distance(case))


def test_a_target_the_case_lacks_reads_far_and_only_the_union_form_refuses_no_target():
    case = single_voxel_case(empty_56=True)  # an OpenKBP-like patient without PTV56
    inputs = model_inputs(case, InputSpec(TWO_TARGETS, target_distance="per_target"))
    assert np.all(inputs[..., 4] == pipeline.DISTANCE_RANGE[1]) and pipeline.DISTANCE_RANGE[1] == 4.0
    np.testing.assert_allclose(inputs[..., 3], distance_by_hand((1, 2, 3), case.shape, case.spacing_mm), atol=1e-6)
    none = case.replace(masks=np.stack([np.zeros_like(case.masks[0]), case.masks[1], case.masks[2]]))
    assert np.all(model_inputs(none, InputSpec(TWO_TARGETS, target_distance="per_target"))[..., 3:] == 4.0)
    with pytest.raises(FlaxdoseError, match="no target voxels"):
        model_inputs(none, InputSpec(TWO_TARGETS, target_distance=True))


def test_ct_channel_is_clipped_hu_over_1000_and_comes_last():
    hu = np.array([-3000.0, -1000.0, 0.0, 500.0, 2000.0, 3500.0, 40.0])
    ct = np.broadcast_to(hu[:, None, None], (7, 6, 5)).copy()
    case = single_voxel_case(ct=ct)
    expected = np.array([-1.0, -1.0, 0.0, 0.5, 2.0, 2.0, 0.04], np.float32)
    np.testing.assert_allclose(pipeline.ct_channel(case)[:, 0, 0], expected, atol=1e-6)
    both = model_inputs(case, InputSpec(TWO_TARGETS, target_distance="per_target", include_ct=True))
    assert both.shape[-1] == 6 and both.dtype == np.float32  # masks, PTV70, PTV56, CT
    np.testing.assert_allclose(both[:, 2, 3, 5], expected, atol=1e-6)
    np.testing.assert_array_equal(both[..., :5], model_inputs(case, InputSpec(TWO_TARGETS, "per_target")))
    ct_only = model_inputs(case, InputSpec(TWO_TARGETS, include_ct=True))
    assert ct_only.shape[-1] == 4 and ct_only.dtype == np.float32
    np.testing.assert_array_equal(ct_only[..., 3], both[..., 5])
    assert model_inputs(case, InputSpec(TWO_TARGETS)).dtype == np.uint8  # masks alone stay uint8


def test_a_case_without_ct_is_refused_naming_it_and_the_fix_and_can_be_filtered_out(tmp_path):
    with pytest.raises(FlaxdoseError, match=r"case 'c' has no CT.*import_dicom --include_ct.*cases_with_ct"):
        model_inputs(single_voxel_case(), InputSpec(TWO_TARGETS, include_ct=True))
    cases = phantom_cases(1, 3, shape=(16, 16, 8))
    cases[1] = cases[1].replace(ct=np.zeros(cases[1].shape, np.float32))
    ids = [c.case_id for c in cases]
    dataset = write_dataset(tmp_path / "ds", cases, {"train": ids})
    assert pipeline.cases_with_ct(dataset, ids) == [ids[1]] and dataset.has_ct(ids[1]) and not dataset.has_ct(ids[0])
    spec = InputSpec(PROSTATE_STRUCTURES, include_ct=True)
    with pytest.raises(FlaxdoseError, match=rf"2 of the 3 training cases .* have no CT \('{ids[0]}', '{ids[2]}'\)"):
        pipeline.CaseSource(dataset, ids, spec)
    source = pipeline.CaseSource(dataset, pipeline.cases_with_ct(dataset, ids), spec)
    assert source[0]["inputs"].shape == (16, 16, 8, 7)


def test_input_spec_counts_channels_and_refuses_unknown_settings():
    assert InputSpec.from_config(config_lib.load_config("quick")) == InputSpec(PROSTATE_STRUCTURES, True, False)
    config = config_lib.load_config("source", {"data.target_distance": "per_target", "data.include_ct": True})
    spec = InputSpec.from_config(config)
    assert spec.channels == 6 + 1 + 1 and spec.describe() == "6 structure masks + 1 per-target distance channel + the CT"
    assert len(spec.channel_names()) == spec.channels and spec.channel_names()[-1].startswith("CT in HU")
    assert InputSpec(PROSTATE_STRUCTURES, np.bool_(True)).target_distance is True
    with pytest.raises(FlaxdoseError, match="choose False .* or 'per_target'"):
        InputSpec(PROSTATE_STRUCTURES, "union")
    with pytest.raises(FlaxdoseError, match="holds no target"):
        InputSpec(("Bladder", "Rectum"), "per_target")
    with pytest.raises(FlaxdoseError, match=r"are 8 channels but model.in_channels is 7; set --config.model.in_channels=8"):
        pipeline.check_in_channels(spec, 7)
    # flips swap the femoral heads and leave the distance and CT channels in place
    perm = spec.lr_swap_permutation()
    assert perm == (0, 1, 2, 4, 3, 5, 6, 7)


def test_training_refuses_an_in_channels_without_the_new_channels(tmp_path, make_config):
    # the built-in phantoms have no CT (refused on its own): the trainer's count with the distance channels,
    # the CT's count where a dataset with a CT would meet it
    config = make_config(**{"data.target_distance": "per_target", "model.in_channels": 6})
    with pytest.raises(FlaxdoseError, match=r"per-target distance channel\) are 7 channels .*in_channels=7"):
        trainer.train_and_evaluate(config, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    with pytest.raises(FlaxdoseError, match=r"the CT\) are 8 channels .*in_channels=8"):
        pipeline.check_in_channels(InputSpec(PROSTATE_STRUCTURES, "per_target", include_ct=True), 7)


# ---------------------------------------------------------------- a tiny model with both, trained 2 steps
STRUCTURES = ("PTV", "PTV_boost", "Rectum", "Body")


def ct_dataset(root):
    """Phantoms with a second target (the PTV's inner part; empty in one case) and a CT (air, soft tissue,
    bone in the femoral heads); 4 train, 2 val, 1 test."""
    cases = []
    for i, case in enumerate(phantom_cases(3, 7, shape=(16, 16, 8))):
        ptv = case.mask("PTV")
        boost = ptv & np.roll(ptv, 1, 0) & np.roll(ptv, -1, 0) if i != 2 else np.zeros_like(ptv)
        ct = np.where(case.mask("Body"), 40.0, -1000.0) + 1200.0 * (case.mask("Femur_Head_L") | case.mask("Femur_Head_R"))
        masks = np.stack([ptv, boost, case.mask("Rectum"), case.mask("Body")])
        cases.append(case.replace(structures=STRUCTURES, masks=masks, ct=ct))
    ids = [c.case_id for c in cases]
    return write_dataset(root, cases, {"train": ids[:4], "val": ids[4:6], "test": ids[6:]})


@pytest.fixture(scope="module")
def ct_run(tmp_path_factory):
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("ct")
    dataset = ct_dataset(root / "data")
    config = tiny_config(**{"data.kind": "folder", "data.path": str(dataset.root), "data.structures": STRUCTURES,
                            "data.target_distance": "per_target", "data.include_ct": True, "model.in_channels": 7,
                            "data.val_cases": 0, "train.steps": 2, "train.eval_every": 2,
                            "train.checkpoint_every": 2})
    trainer.train_and_evaluate(config, root / "run")
    return root / "run", dataset


def test_a_model_with_ct_and_per_target_inputs_predicts_and_its_package_keeps_them(ct_run, tmp_path):
    workdir, dataset = ct_run
    model = Model.load(workdir)
    assert model.inputs == InputSpec(STRUCTURES, "per_target", True) and model.spec.in_channels == 7
    case = dataset.load(dataset.split("test")[0])
    pred = model.predict([case])[0].dose
    inputs = model_inputs(case, model.inputs)
    assert inputs.shape == (*case.shape, 7)
    by_hand = np.clip(model.predict_relative(inputs), 0, None) * case.prescription_gy * case.dose_region()
    np.testing.assert_allclose(pred, by_hand, rtol=1e-5, atol=1e-5)
    no_ct = inputs.copy()
    no_ct[..., 6] = 0  # the prediction does use the CT channel
    assert not np.allclose(model.predict_relative(no_ct), model.predict_relative(inputs), atol=1e-6)
    with pytest.raises(FlaxdoseError, match=rf"case '{case.case_id}' has no CT, but model '{workdir.name}' takes"):
        model.predict([case.replace(ct=None)])

    pkg = tmp_path / "pkg"
    package.export_model(workdir, pkg)
    kept = json.loads((pkg / package.CONFIG).read_text())["data"]
    assert (kept["target_distance"], kept["include_ct"]) == ("per_target", True)
    meta = json.loads((pkg / package.METADATA).read_text())
    assert len(meta["inputs"]["channels"]) == 7 and meta["inputs"]["ct_required"] is True
    from_pkg = Model.load(pkg)
    assert from_pkg.inputs == model.inputs
    np.testing.assert_array_equal(from_pkg.predict([case])[0].dose, pred)

    # a package whose config says other inputs than its model takes (hashes made consistent) is refused
    bad = tmp_path / "bad"
    shutil.copytree(pkg, bad)
    config = json.loads((bad / package.CONFIG).read_text())
    config["data"]["include_ct"] = False
    (bad / package.CONFIG).write_text(json.dumps(config))
    meta["files"][package.CONFIG] = package.sha256_file(bad / package.CONFIG)
    meta["package_sha256"] = package.package_hash(meta)
    (bad / package.METADATA).write_text(json.dumps(meta))
    with pytest.raises(FlaxdoseError, match=r"gives 6 input channels .* its model takes 7 .*export it again"):
        Model.load(bad)


def test_transfer_refuses_a_source_with_other_ct_or_distance_inputs(ct_run, tmp_path, make_config):
    workdir, dataset = ct_run
    base = {"transfer.mode": "paper", "transfer.source": str(workdir), "data.kind": "folder",
            "data.path": str(dataset.root), "data.structures": STRUCTURES, "data.val_cases": 0}
    with pytest.raises(FlaxdoseError, match=r"pass --config.data.include_ct=True --config.model.in_channels=7"):
        trainer.train_and_evaluate(make_config(**base, **{"data.target_distance": "per_target",
                                                          "data.include_ct": False, "model.in_channels": 6}), tmp_path / "a")
    with pytest.raises(FlaxdoseError, match=r"pass --config.data.target_distance=per_target --config.model.in_channels=7"):
        trainer.train_and_evaluate(make_config(**base, **{"data.target_distance": True, "data.include_ct": True,
                                                          "model.in_channels": 6}), tmp_path / "b")


def test_predict_dicom_reads_the_plans_ct_for_a_ct_model(rt_export, rt_export_ct):
    from flaxdose.inference.dicom_plans import read_dicom_case

    spec = UNetSpec(features=(4, 8), convs_per_level=1, groups=2, in_channels=7)
    model = Model(spec, {}, PROSTATE_STRUCTURES, name="ct_model",  # reading needs its inputs, not its weights
                  inputs=InputSpec(PROSTATE_STRUCTURES, include_ct=True))
    case = read_dicom_case([model], rt_export_ct["folder"], 70.0, model_shape=(32, 32, 28))
    assert case.ct is not None and case.ct.shape == case.shape == (32, 32, 28)
    channel = model_inputs(case, model.inputs)[..., 6]  # the plan's CT resampled onto the model grid, scaled
    np.testing.assert_array_equal(channel, pipeline.ct_channel(case))
    assert channel.min() == -1.0 and channel.max() > channel.min()  # air outside the CT, the patient inside
    with pytest.raises(FlaxdoseError, match=r"has no CT series for its plan.*model 'ct_model' takes the CT"):
        read_dicom_case([model], rt_export["folder"], 70.0, model_shape=(32, 32, 28))

