"""Plan QA (flaxdose.planqa, flaxdose.qa) and the style-check face: bands by hand, worse twins flagged, CLIs end to end."""

import csv
import dataclasses
import json
import subprocess
import sys

import dicom_factory as F
import numpy as np
import pytest
from independent_dvh import ROI_NAME, dvh, per_plane_doses
from planqa_cases import fixed_prediction, uniform_plan

from flaxdose import planqa
from flaxdose.data import write_dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.synthetic.phantom import phantom_case
from flaxdose.training import trainer

SHAPE = (16, 16, 8)
T3_95 = 2.353363  # Student t, 3 degrees of freedom, 95th percentile (two-sided 90 %), from tables


@pytest.fixture(scope="module")
def anatomy():
    return phantom_case(3, 0, shape=SHAPE)


@pytest.fixture(scope="module")
def hand_calibration(anatomy):
    # Residuals 1, 2, 3, 6 Gy (references 21, 22, 23, 26; members 19 and 21 -> mean 20, variance 2).
    refs = [uniform_plan(anatomy, d, f"cal{d}") for d in (21.0, 22.0, 23.0, 26.0)]
    preds = [fixed_prediction(anatomy, [19.0, 21.0]) for _ in refs]
    return planqa.calibrate_predictions(preds, refs, members=("a", "b"), note="hand")


def test_band_by_hand(anatomy, hand_calibration):
    cal = hand_calibration.metrics["Rectum Dmean"]
    # b = 3, s^2 = (4 + 1 + 0 + 9) / 3 = 14/3, mean member variance 2
    assert cal.n == 4 and cal.bias_gy == pytest.approx(3.0) and cal.residual_sd_gy ** 2 == pytest.approx(14 / 3)
    assert cal.member_sd_gy ** 2 == pytest.approx(2.0) and cal.extra_variance == pytest.approx(14 / 3 - 2)
    # New case: members 29, 31 (mean 30, variance 2): sigma^2 = 2 + 8/3 + (14/3)/4 = 5.8333
    band = hand_calibration.band("Rectum Dmean", fixed_prediction(anatomy, [29.0, 31.0]), level=0.9)
    sigma = np.sqrt(2 + 8 / 3 + 14 / 12)
    assert band.centre == pytest.approx(33.0) and band.sigma == pytest.approx(sigma)
    assert band.lower == pytest.approx(33.0 - T3_95 * sigma, abs=1e-4)
    assert band.upper == pytest.approx(33.0 + T3_95 * sigma, abs=1e-4)  # 38.6838
    # Members that disagree more than the reference plans scatter: 15 and 25 (variance 50) on every
    # calibration case. lambda = (14/3) / 50 scales the spread down; no extra term.
    refs = [uniform_plan(anatomy, d, f"cal{d}") for d in (21.0, 22.0, 23.0, 26.0)]
    wide = planqa.calibrate_predictions([fixed_prediction(anatomy, [15.0, 25.0]) for _ in refs], refs, ("a", "b"))
    assert wide.metrics["PTV D95"].spread_scale == pytest.approx(14 / 150) and wide.metrics["PTV D95"].extra_variance == 0
    band = wide.band("PTV D95", fixed_prediction(anatomy, [29.0, 31.0]), level=0.9)
    assert band.sigma == pytest.approx(np.sqrt(14 / 150 * 2 + 14 / 12))
    with pytest.raises(FlaxdoseError, match="level"):
        hand_calibration.band("Rectum Dmean", fixed_prediction(anatomy, [29.0, 31.0]), level=90)


def test_flags_and_coverage_by_hand(anatomy, hand_calibration):
    """Band of every metric: 27.316..38.684 Gy (test above). A uniform 39 Gy plan is above every band
    by 0.316 Gy; a 27 Gy plan below by 0.316 Gy."""
    pred = fixed_prediction(anatomy, [29.0, 31.0])
    hot = {(r["structure"], r["metric"]): r for r in planqa.check_plan(uniform_plan(anatomy, 39.0), pred, hand_calibration, 0.9, 0.0)}
    assert hot["Rectum", "D2"]["position"] == "above" and hot["Rectum", "D2"]["flagged"]
    assert hot["Rectum", "D2"]["excess_gy"] == pytest.approx(39.0 - 38.6838, abs=1e-3)
    assert not hot["PTV", "D2"]["flagged"] and hot["PTV", "D2"]["position"] == "above"  # target hot spots: shown only
    assert not hot["PTV", "D95"]["flagged"] and hot["PTV", "D95"]["excess_gy"] < 0
    calm = planqa.check_plan(uniform_plan(anatomy, 39.0), pred, hand_calibration, 0.9, tolerance_gy=1.0)
    assert not any(r["flagged"] for r in calm)  # 0.316 Gy above: within the tolerance
    cold = {(r["structure"], r["metric"]): r for r in planqa.check_plan(uniform_plan(anatomy, 27.0), pred, hand_calibration, 0.9, 0.0)}
    assert cold["PTV", "D95"]["flagged"] and cold["PTV", "D98"]["flagged"] and not cold["PTV", "Dmean"]["flagged"]
    assert not cold["Bladder", "Dmean"]["flagged"] and cold["Bladder", "Dmean"]["position"] == "below"

    rows = [{"case_id": c, "structure": "Rectum", "metric": "D2", "position": p}
            for c, p in zip("abcde", ("inside", "inside", "above", "inside", "below"))]
    rows.append({"case_id": "f", "structure": "Rectum", "metric": "D2", "position": "n/a"})
    assert planqa.coverage(rows) == {"Rectum D2": {"n": 5, "inside": 3, "above": 1, "below": 1, "coverage": 0.6}}


def test_ranking():
    row = lambda case, excess, flagged: {"case_id": case, "structure": "Rectum", "metric": "D2", "excess_gy": excess,
                                         "flagged": flagged}
    rows = [row("a", -2.0, False), row("b", 3.0, True), row("c", 7.0, True), row("d", 0.5, False), row("d", np.nan, False)]
    ranked = planqa.rank_plans(rows)
    assert [p["case_id"] for p in ranked] == ["c", "b", "d", "a"] and [p["rank"] for p in ranked] == [1, 2, 3, 4]
    assert ranked[0]["flags"] == ["Rectum D2"] and ranked[2]["score_gy"] == 0.5


def test_expand_workdirs(tmp_path):
    for seed in (1, 0):
        (tmp_path / "runs" / f"internal_a_n010_full_seed{seed}_lr0.0003").mkdir(parents=True)
    found = planqa.expand_workdirs([str(tmp_path / "runs" / "internal_a_n010_full_seed*")])
    assert [p.name for p in found] == ["internal_a_n010_full_seed0_lr0.0003", "internal_a_n010_full_seed1_lr0.0003"]
    with pytest.raises(FlaxdoseError, match="no workdir matches"):
        planqa.expand_workdirs([str(tmp_path / "runs" / "external*")])


# ---------------------------------------------------------------- with trained models
@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two tiny models: the checkpoints at steps 6 and 12 of one run on phantom plans (seconds)."""
    from conftest import tiny_config

    workdir = tmp_path_factory.mktemp("ensemble") / "run"
    config = tiny_config(**{"train.steps": 12, "train.checkpoint_every": 6, "train.eval_every": 6, "data.n_train": 8,
                            # the plan-QA study's setup (quick.base_config): masks only, plain MSE
                            "data.target_distance": False, "model.in_channels": 6, "train.target_weight": 1.0})
    trainer.train_and_evaluate(config, workdir)
    return [workdir / "checkpoints" / "6", workdir / "checkpoints" / "12"]


def worse_twin(case):
    """The same anatomy with 20 Gy more in the rectum: a plan that spares the rectum less."""
    return case.replace(case_id=case.case_id + "_worse", dose=case.dose + 20.0 * case.mask("Rectum"))


@pytest.fixture(scope="module")
def qa_data(tmp_path_factory):
    """Calibration plans (phantom seed 7) and plans to check: two good plans and the worse twin of the first."""
    root = tmp_path_factory.mktemp("qa_data")
    calibration = [phantom_case(7, i, shape=SHAPE) for i in range(8)]
    good = [phantom_case(7, i, shape=SHAPE) for i in (20, 21)]
    cases = [*calibration, *good, worse_twin(good[0])]
    splits = {"calibration": [c.case_id for c in calibration], "check": [c.case_id for c in cases[8:]]}
    return write_dataset(root / "data", cases, splits).root, good


def test_worse_twin_is_flagged_and_its_unchanged_twin_not(members, qa_data):
    data, (good, other) = qa_data
    ensemble = planqa.Ensemble.load(members)
    references, missing = planqa.load_plans(data, "calibration")
    calibration = planqa.calibrate(ensemble, references)
    assert not missing and len(calibration.cases) == 8 and calibration.members == ("run", "run (2)")
    result = planqa.run_qa(ensemble, calibration, [good, worse_twin(good), other], level=0.95, tolerance_gy=1.0)
    plans = {p["case_id"]: p for p in result.plans}
    assert plans[good.case_id + "_worse"]["flagged"] and plans[good.case_id + "_worse"]["rank"] == 1
    assert set(plans[good.case_id + "_worse"]["flags"]) <= {"Rectum Dmean", "Rectum D2"}
    assert not plans[good.case_id]["flagged"] and not plans[other.case_id]["flagged"]
    # the twins share one prediction: their bands are identical, only the plans differ
    bands = {(r["case_id"], r["structure"], r["metric"]): (r["lower_gy"], r["upper_gy"]) for r in result.rows}
    assert bands[good.case_id, "Rectum", "Dmean"] == bands[good.case_id + "_worse", "Rectum", "Dmean"]
    with pytest.raises(FlaxdoseError, match="members"):
        planqa.run_qa(planqa.Ensemble.load(members[:1]), calibration, [good])


def run_qa_cli(*args):
    return subprocess.run([sys.executable, "-m", "flaxdose.qa", *args], capture_output=True, text=True, timeout=300)


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_qa_cli_on_a_dataset_then_a_dicom_export(members, qa_data, tmp_path):
    data, (good, _) = qa_data
    workdirs = f"{members[0]},{members[0].parent}/1*"  # a path and a glob (as for a sweep's runs)
    out = tmp_path / "qa"
    proc = run_qa_cli(f"--workdirs={workdirs}", f"--calibration_data={data}", "--calibration_split=calibration",
                      f"--data={data}", "--split=check", f"--out={out}")
    assert proc.returncode == 3, proc.stderr  # cli.FLAGGED: every plan checked, the worse twin flagged
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [p["case_id"] for p in printed["flagged"]] == [good.case_id + "_worse"]
    rows = read_csv(out / "qa.csv")
    assert rows[0]["case_id"] == good.case_id + "_worse" and rows[0]["rank"] == "1"
    assert len(rows) == 3 * 12  # 3 plans x (PTV: 4 metrics, 4 OARs: 2 metrics)
    assert (out / f"plan_{good.case_id}_worse.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / f"plan_{good.case_id}.png").exists()
    assert "1 of 3 plans flagged" in (out / "report.md").read_text()

    export = F.write_export(tmp_path / "patient")
    dicom_out = tmp_path / "qa_dicom"
    coarse = run_qa_cli(f"--workdirs={workdirs}", f"--calibration={out / 'calibration.json'}", f"--dicom={export['folder']}",
                        "--model_shape=16,16,8", "--model_spacing_mm=8,8,8", f"--out={dicom_out}")
    assert coarse.returncode == 2 and "trained on 4x4x5 mm" in coarse.stderr  # not the members' phantom spacing
    grid = ["--model_shape=32,32,16", "--model_spacing_mm=4,4,5"]  # the whole export at the members' spacing
    proc = run_qa_cli(f"--workdirs={workdirs}", f"--calibration={out / 'calibration.json'}", f"--dicom={export['folder']}",
                      *grid, f"--out={dicom_out}")
    info = json.loads((dicom_out / "summary.json").read_text())
    assert proc.returncode == (3 if info["num_flagged"] else 0), proc.stderr
    # the plan's metrics are those of its own RTDOSE on its own grid (issue 30): equal to an independent per-plane
    # DVH of the exported RD file and RS contours, not the model grid's (4 x 4 x 5 mm here)
    rows = read_csv(dicom_out / "qa.csv")
    got = {(r["structure"], r["metric"]): float(r["plan_gy"]) for r in rows}
    assert {r["grid"] for r in rows} == {"RTDOSE grid 3x3x2.5 mm, 41x39x32 voxels"}
    assert "RTDOSE grid 3x3x2.5 mm" in (dicom_out / "report.md").read_text()
    for structure in ("PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R"):
        expected = dvh(per_plane_doses(export["dose"], export["struct"], ROI_NAME[structure]))
        for metric in ("Dmean", "D2", "D95", "D98") if structure == "PTV" else ("Dmean", "D2"):
            assert got[structure, metric] == pytest.approx(expected[metric], abs=0.05), (structure, metric)
    assert got["PTV", "D95"] > 0.5 * F.PRESCRIPTION
    clinical = {(r["structure"], r["metric"]): r for r in read_csv(dicom_out / "clinical_metrics.csv")}
    assert clinical["Rectum", "V50Gy[%]"]["grid"] == "RTDOSE grid 3x3x2.5 mm, 41x39x32 voxels"
    rectum = per_plane_doses(export["dose"], export["struct"], ROI_NAME["Rectum"])
    assert float(clinical["Rectum", "V50Gy[%]"]["plan"]) == pytest.approx(100 * np.mean(rectum >= 50), abs=1e-3)


def test_generator_plans_twins_of_one_anatomy():
    """generate_case takes a Style: the same anatomy planned with the rectum weight / 10 spares the rectum less."""
    from flaxdose.synthetic.generator import generate_case
    from flaxdose.synthetic.styles import STYLE_TABLE

    source = STYLE_TABLE["source"]
    lax = dataclasses.replace(source, name="source_rectum_x0.1", rectum=source.rectum / 10)
    plan, twin = generate_case("source", 0, 5000, scale=0.5), generate_case(lax, 0, 5000, scale=0.5)
    assert twin.case_id == "source_rectum_x0.1_0_5000" and twin.style == "source_rectum_x0.1"
    np.testing.assert_array_equal(plan.masks, twin.masks)
    rectum = lambda c: float(c.dose[c.mask("Rectum") & ~c.mask("PTV")].mean())
    assert rectum(twin) > rectum(plan) + 1.0


def test_style_check_cli(members, qa_data, tmp_path):
    """The clinic's plans: the calibration anatomies with 10 Gy more in both femoral heads. Same masks,
    so the same prediction: the clinic's femoral-head errors shift by exactly -10 Gy = -100 * 10 / 70 % of Rx."""
    data, _ = qa_data
    references, _ = planqa.load_plans(data, "calibration")
    femurs = lambda c: c.mask("Femur_Head_L") | c.mask("Femur_Head_R")
    clinic = [c.replace(dose=c.dose + 10.0 * femurs(c)) for c in references]
    clinic_data = write_dataset(tmp_path / "clinic", clinic, {"train": [c.case_id for c in clinic]}).root
    results = tmp_path / "results.csv"
    results.write_text("run_id,style,n_train,mode,seed,learning_rate,dice_mean,dvh_abs_err_pct\n"
                       "a,clinic,2,full,0,0.001,0.5,9\nb,clinic,4,full,0,0.001,0.9,5\n")
    out = tmp_path / "assess"
    proc = subprocess.run([sys.executable, "-m", "flaxdose.assess_style", f"--workdirs={members[1]}", f"--own_data={data}",
                           "--own_split=calibration", f"--data={clinic_data}", f"--curve={results}", "--curve_style=clinic",
                           f"--out={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((out / "assessment.json").read_text())
    shifts = saved["distance"]["metrics"]
    for side in ("L", "R"):
        assert shifts[f"Femur_Head_{side} Dmean"]["shift"] == pytest.approx(-1000 / 70, abs=1e-3)
        assert shifts[f"Femur_Head_{side} D2"]["shift"] == pytest.approx(-1000 / 70, abs=1e-3)
    assert shifts["Rectum Dmean"]["shift"] == pytest.approx(0.0, abs=1e-6)
    assert saved["distance"]["dice_mean"]["own"]["n"] == saved["distance"]["dice_mean"]["clinic"]["n"] == 8
    assert saved["recommendation"]["plans_needed"] == 4 and saved["recommendation"]["curve"]["name"] == "full"
    assert "## Recommendation" in (out / "report.md").read_text()


def test_calibration_on_a_members_training_plans_is_refused(members, qa_data):
    from flaxdose.run import Run

    data, _ = qa_data
    references, _ = planqa.load_plans(data, "calibration")
    planqa.check_held_out(members, references)  # other patients: accepted
    dataset, seen = Run.open(members[0]).trained_cases()
    assert len(seen) == 8  # tiny_config's n_train: training and validation plans
    with pytest.raises(FlaxdoseError, match="trained on"):
        planqa.check_held_out(members, [*references, dataset.load(seen[-1])])


def test_a_calibration_on_fewer_than_10_plans_is_warned_about(anatomy, caplog):
    def calibrate(n):
        refs = [uniform_plan(anatomy, 20.0 + i, f"cal{i}") for i in range(n)]
        caplog.clear()
        with caplog.at_level("WARNING", logger="flaxdose.planqa"):
            planqa.calibrate_predictions([fixed_prediction(anatomy, [19.0, 21.0]) for _ in refs], refs, ("a", "b"))
        return caplog.text

    assert "calibrated on 4 held-out plans, fewer than 10" in calibrate(4)
    assert "fewer than" not in calibrate(10)
    info = {"level": 0.95, "note": "", "members": ["a", "b"], "calibration_cases": 4, "calibration_note": "",
            "tolerance_gy": 1.0, "num_flagged": 0, "num_plans": 0, "inside_band": {}, "plans": []}
    assert "**Warning: calibrated on 4 held-out plans" in planqa.markdown(info, {}, [])
    assert "Warning" not in planqa.markdown({**info, "calibration_cases": 12}, {}, [])


def test_the_qa_figure_draws_the_prediction_keeps_its_legend_off_the_bands_and_shows_the_difference(tmp_path,
                                                                                                  monkeypatch):
    """plots.plan_bands: the ensemble's mean predicted DVH is drawn (dashed, values by hand), the DVH legend lies
    outside the DVH axes (clear of the bands), and a panel shows plan - predicted dose on an axial slice."""
    from flaxdose import plots

    plan = phantom_case(0, 0, shape=SHAPE)
    members = np.stack([plan.dose * f for f in (0.9, 1.0, 1.05)]).astype(np.float32)
    mean = members.mean(axis=0)
    rows = [{"structure": "PTV", "metric": "D95", "position": "inside", "lower_gy": 60.0, "upper_gy": 70.0,
             "plan_gy": 66.0, "predicted_gy": 65.0, "flagged": False, "grid": "model grid"},
            {"structure": "Rectum", "metric": "D2", "position": "above", "lower_gy": 30.0, "upper_gy": 40.0,
             "plan_gy": 45.0, "predicted_gy": 35.0, "flagged": True, "grid": "model grid"}]
    figures = []
    real_save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (figures.append(fig), real_save(fig, path))[1])
    assert plots.plan_bands(plan, members, rows, tmp_path / "qa.png").read_bytes()[:4] == b"\x89PNG"
    fig = figures[0]
    dvh_ax, _, diff_ax = fig.axes[:3]
    renderer = fig.canvas.get_renderer()
    legend = dvh_ax.get_legend().get_window_extent(renderer)
    assert not legend.overlaps(dvh_ax.get_window_extent(renderer))  # below the axes, not over the bands
    rectum = plan.mask("Rectum")
    dashed = [line for line in dvh_ax.get_lines() if line.get_linestyle() == "--" and len(line.get_xdata()) > 2]
    drawn = [s for s in plan.structures if s != "Body" and plan.mask(s).any()]
    assert len(dashed) == len(drawn)
    doses_gy, volumes = dashed[drawn.index("Rectum")].get_data()
    by_hand = [100.0 * np.mean(mean[rectum] >= d) for d in doses_gy]  # % of the rectum receiving at least d
    np.testing.assert_allclose(volumes, by_hand, atol=1e-6)
    shown = diff_ax.get_images()[0]
    k = int(round(np.argwhere(plan.mask("PTV"))[:, 2].mean()))  # the axial slice through the PTV centre
    np.testing.assert_allclose(np.asarray(shown.get_array()), (plan.dose - mean)[:, :, k].T, atol=1e-5)
    low, high = shown.get_clim()
    assert low == -high and high == pytest.approx(np.abs(plan.dose - mean)[:, :, k].max(), rel=1e-6)


def test_split_all_means_what_it_means_for_evaluate_and_predict(tmp_path):
    """`load_plans(data, "all")`: every split's plans once, in split order, like evaluate's and predict's
    --split all (`data.case.with_all_split`); a dataset with its own split named "all" keeps that split."""
    cases = [phantom_case(3, i, shape=SHAPE) for i in range(3)]
    ids = [c.case_id for c in cases]
    data = write_dataset(tmp_path / "d", cases, {"test": [ids[2]], "train": ids[:2]}).root
    plans, missing = planqa.load_plans(data, "all")
    assert [p.case_id for p in plans] == [ids[2], ids[0], ids[1]] and missing == []
    named = write_dataset(tmp_path / "n", cases, {"train": ids, "all": [ids[1]]}).root
    assert [p.case_id for p in planqa.load_plans(named, "all")[0]] == [ids[1]]


def test_qa_refuses_a_wrong_split_before_calibrating(members, qa_data, tmp_path):
    """The plans to check are read before the ensemble calibrates: a wrong --split is the first error (here the
    calibration data does not even exist), not one after minutes of prediction."""
    data, _ = qa_data
    workdirs = ",".join(str(m) for m in members)
    proc = run_qa_cli(f"--workdirs={workdirs}", f"--calibration_data={tmp_path / 'nosuch'}", f"--data={data}",
                      "--split=val", f"--out={tmp_path / 'qa'}")
    assert proc.returncode == 2 and "has no split 'val'" in proc.stderr and "nosuch" not in proc.stderr, proc.stderr
    assert not (tmp_path / "qa").exists()
