"""Model packages (issue 30, "A model package"): a trained model as one self-describing, hash-checked folder that
predict and qa load wherever they load a workdir, predicting exactly what the workdir predicts, and that never
holds a patient's name or ID."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from flaxdose import config as config_lib
from flaxdose.data.case import Dataset, write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.inference import package
from flaxdose.inference.predictor import Model


@pytest.fixture(scope="module")
def workdir(phantom_run):
    return phantom_run  # conftest's session model: 24 x 24 x 16 phantoms of 4 x 4 x 5 mm, 6 train / 2 test, 2 val


def data_dir(workdir):
    return next((workdir / "data").iterdir())


@pytest.fixture(scope="module")
def pkg(workdir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pkg") / "phantom_model"
    package.export_model(workdir, out)
    return out


def cli(module, *args):
    return subprocess.run([sys.executable, "-m", f"flaxdose.{module}", *map(str, args)], capture_output=True,
                          text=True, timeout=300)


def test_the_package_predicts_exactly_what_its_workdir_predicts(workdir, pkg):
    dataset = Dataset.open(data_dir(workdir))
    cases = [dataset.load(i) for i in dataset.split("test")]
    from_run, from_pkg = Model.load(workdir), Model.load(pkg)
    assert from_pkg.name == workdir.name  # a QA calibration made with the workdir fits the package
    assert (from_pkg.structures, from_pkg.window, from_pkg.inputs, from_pkg.spec) == \
        (from_run.structures, from_run.window, from_run.inputs, from_run.spec)
    for a, b in zip(from_run.predict(cases, check=False), from_pkg.predict(cases, check=False)):
        assert a.dose.max() > 0
        np.testing.assert_array_equal(a.dose, b.dose)
    # the metadata file's own path works too, and so does the spacing check (4 x 4 x 5 mm phantoms, not 8 x 8 x 6)
    with pytest.raises(FlaxdoseError, match="voxel spacing 8x8x6 mm"):
        Model.load(pkg / package.METADATA).predict([cases[0].replace(spacing_mm=(8.0, 8.0, 6.0))])


def test_the_metadata_describes_the_model(workdir, pkg):
    meta = json.loads((pkg / package.METADATA).read_text())
    run_config = config_lib.load_config_json(workdir / "config.json")
    assert sorted(p.name for p in pkg.iterdir()) == sorted([package.METADATA, package.CONFIG, package.PARAMS])
    assert meta["format"] == "flaxdose-model-package" and meta["format_version"] == 1
    assert "not for clinical use without commissioning" in meta["intended_use"].lower()
    assert meta["inputs"]["structures"] == ["PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "Body"]
    channels = meta["inputs"]["channels"]
    assert len(channels) == run_config.model.in_channels == 7 and channels[0].startswith("PTV mask")
    assert "signed distance" in channels[-1]  # the quick recipe's 7th channel, last
    assert meta["inputs"]["voxel_spacing_mm"]["trained_on"] == {"min": [4.0, 4.0, 5.0], "max": [4.0, 4.0, 5.0]}
    assert meta["inputs"]["window_voxels"] == [8, 8, 8]
    assert "prescription" in meta["output"]["normalisation"]
    # conftest: 6 training plans (the last 2 of them validate), 2 test plans, all 70 Gy on 24 x 24 x 16 voxels
    data = meta["training"]["data"]
    assert data["cases"] == {"training": 4, "validation": 2, "other_splits": {"test": 2}}
    assert data["grid_voxels"] == {"24x24x16": 6} and data["prescription_gy"] == {"min": 70.0, "max": 70.0}
    from flaxdose.checkpoint import find_checkpoint

    assert meta["training"]["step"] == find_checkpoint(workdir, "best")[1]
    n_params = sum(a.size for a in np.load(pkg / package.PARAMS).values())
    assert meta["model"]["parameters"] == n_params > 0
    # the hashes are the files' SHA-256, computed here
    for name in (package.CONFIG, package.PARAMS):
        assert meta["files"][name] == hashlib.sha256((pkg / name).read_bytes()).hexdigest()
    from flaxdose import __version__

    assert meta["flaxdose_version"] == __version__


def test_no_patient_name_or_id_is_ever_written(workdir, tmp_path):
    """A run whose case ids are patients' names and IDs (an import with --keep_ids) exports none of them, nor
    the dataset's location."""
    run = tmp_path / "run_with_ids"
    shutil.copytree(workdir, run)
    data = data_dir(run)
    dataset = Dataset.open(data)
    ids = sorted({i for v in dataset.splits.values() for i in v})
    rename = {i: f"DOE^JANE_MRN{4711000 + n}" for n, i in enumerate(ids)}
    cases = [dataset.load(i).replace(case_id=rename[i]) for i in rename]
    shutil.rmtree(data)
    write_dataset(data, cases, {k: [rename[i] for i in v] for k, v in dataset.splits.items()})
    metadata = package.export_model(run, tmp_path / "pkg")
    assert metadata["training"]["data"]["cases"]["training"] == 4  # the summary was made from these cases
    written = b"".join(p.read_bytes() for p in (tmp_path / "pkg").iterdir())
    for name in [*rename.values(), "DOE", "MRN47110", str(data), str(run), str(tmp_path)]:
        assert name.encode() not in written, name


def test_a_tampered_incomplete_or_newer_package_is_refused(pkg, tmp_path):
    def variant(name, change):
        copy = tmp_path / name
        shutil.copytree(pkg, copy)
        change(copy)
        return copy

    def flip_a_byte(copy):
        raw = bytearray((copy / package.PARAMS).read_bytes())
        raw[len(raw) // 2] ^= 0x01  # one weight changed: still a readable npz
        (copy / package.PARAMS).write_bytes(bytes(raw))

    def edit_metadata(copy, **changes):
        meta = json.loads((copy / package.METADATA).read_text())
        for key, value in changes.items():
            meta[key] = value
        (copy / package.METADATA).write_text(json.dumps(meta))
        return meta

    def newer(copy):
        meta = edit_metadata(copy, format_version=package.FORMAT_VERSION + 1)
        edit_metadata(copy, package_sha256=package.package_hash(meta))  # a consistent package, only newer

    def wider_spacing(copy):
        meta = json.loads((copy / package.METADATA).read_text())
        meta["inputs"]["voxel_spacing_mm"]["trained_on"]["max"] = [9.0, 9.0, 9.0]  # the hash not updated
        (copy / package.METADATA).write_text(json.dumps(meta))

    cases = {
        "tampered": (flip_a_byte, r"params.npz does not match the SHA-256 .* do not use it; copy the whole package"),
        "edited": (wider_spacing, r"flaxdose_model.json was changed after export.* do not use it"),
        "incomplete": (lambda c: (c / package.PARAMS).unlink(), r"incomplete: params.npz missing; copy the whole"),
        "newer": (newer, r"format version 2, .* reads versions up to 1: upgrade flaxdose"),
        "no_metadata": (lambda c: (c / package.METADATA).unlink(),
                        r"holds params.npz but no flaxdose_model.json: a model package copied incompletely"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(FlaxdoseError, match=message):
            Model.load(variant(name, change))
    (tmp_path / "not_a_package").mkdir()
    with pytest.raises(FlaxdoseError, match="not a flaxdose model package"):
        package.read_metadata(tmp_path / "not_a_package")


def test_export_refuses_a_package_a_missing_run_and_an_occupied_out(workdir, pkg, tmp_path):
    with pytest.raises(FlaxdoseError, match="already a model package"):
        package.export_model(pkg, tmp_path / "again")
    with pytest.raises(FlaxdoseError, match="does not exist"):
        package.export_model(tmp_path / "nonesuch", tmp_path / "p")
    with pytest.raises(FlaxdoseError, match="already holds files"):
        package.export_model(workdir, pkg)
    with pytest.raises(FlaxdoseError, match="is a model package: .* pass --data DIR"):
        from flaxdose.run import Run

        Run.open(pkg)


def test_export_overwrite_never_deletes_a_strangers_files(workdir, tmp_path):
    """A new user's `export_model --out DIR --overwrite` deleted DIR/precious.txt with exit 0: a folder that is not
    an earlier package is refused (exit 2, one line naming it, its files and the fix) and kept; an earlier package
    is replaced; an empty folder is fine."""
    out = tmp_path / "pu"
    out.mkdir()
    (out / "precious.txt").write_text("hi")
    refused = cli("export_model", f"--workdir={workdir}", f"--out={out}", "--overwrite")
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert str(out) in refused.stderr and "precious.txt" in refused.stderr
    assert "choose another --out, or empty the folder yourself" in refused.stderr
    assert [p.name for p in out.iterdir()] == ["precious.txt"] and (out / "precious.txt").read_text() == "hi"

    earlier = tmp_path / "empty"
    earlier.mkdir()
    package.export_model(workdir, earlier, name="first")  # an empty folder: fine
    (earlier / "old.txt").write_text("a file the earlier export left")  # still recognised by flaxdose_model.json
    assert package.export_model(workdir, earlier, name="second", overwrite=True)["name"] == "second"
    assert "old.txt" not in [p.name for p in earlier.iterdir()]
    assert package.read_metadata(earlier)["name"] == "second"


def test_cli_export_then_predict_and_qa_from_the_package(workdir, tmp_path):
    """The commands as a user types them: export, predict --workdir PKG --data D --split all, qa --workdirs PKG
    (the refusals are FlaxdoseErrors, which every command prints as one line: tests above)."""
    out = tmp_path / "pkg"
    exported = cli("export_model", f"--workdir={workdir}", f"--out={out}")
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert json.loads(exported.stdout.strip().splitlines()[-1])["package"] == str(out.resolve())
    data = data_dir(workdir)
    predicted = cli("predict", f"--workdir={out}", f"--data={data}", "--split=all", f"--out={tmp_path / 'pred'}")
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    dataset = Dataset.open(data)
    every = [i for ids in dataset.splits.values() for i in ids]
    written = Dataset.open(tmp_path / "pred")
    assert written.split("all") == every
    expected = Model.load(workdir).predict([dataset.load(every[0])], check=False)[0].dose
    np.testing.assert_array_equal(written.load(every[0]).dose, expected)

    qa = cli("qa", f"--workdirs={out}", f"--calibration_data={data}", "--calibration_split=test",
             f"--out={tmp_path / 'qa'}")
    assert qa.returncode == 0, qa.stderr[-2000:]
    note = json.loads((tmp_path / "qa" / "calibration.json").read_text())["note"]
    assert "not checked to be held out from the model package" in note


def test_a_fine_tuned_model_says_its_data_summary_is_the_fine_tuning_data(workdir, tmp_path):
    run = tmp_path / "finetuned"
    shutil.copytree(workdir, run, ignore=shutil.ignore_patterns("tensorboard"))
    config = json.loads((run / "config.json").read_text())
    config["transfer"] = {**config.get("transfer", {}), "mode": "decoder", "source": "/somewhere/source_run"}
    (run / "config.json").write_text(json.dumps(config))
    tuned = package.export_model(run, tmp_path / "pkg")["training"]["fine_tuned"]
    assert tuned["mode"] == "decoder" and tuned["source_model"] == "source_run" and "only" in tuned["note"]
    assert "fine_tuned" not in package.export_model(workdir, tmp_path / "plain")["training"]
