"""The plan-QA study's pieces (flaxdose.launch.planqa_study): the degradation table, the worse twins (the PTV
under-covered by 3 %), members of the quick recipe, and the report's must-hold verdicts; seconds, no training."""

import dataclasses

import numpy as np
import pytest
from flaxdose.configs import quick
from flaxdose.launch import planqa_study as study

from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dvh_metrics, plan_dvh_metrics
from flaxdose.synthetic.generator import generate_case
from flaxdose.synthetic.phantom import phantom_case
from flaxdose.synthetic.styles import STYLE_TABLE

SHAPE = (16, 16, 8)


# ---------------------------------------------------------------- the worse twins
def test_the_degradation_table():
    source, fields = STYLE_TABLE["source"], {f.name for f in dataclasses.fields(STYLE_TABLE["source"])}
    keys = set(plan_dvh_metrics(*(lambda c: (c.dose, c.masks, c.structures, c.spacing_mm))(phantom_case(3, 0, shape=SHAPE))))
    for kind, d in study.DEGRADATIONS.items():
        assert set(d.weights) <= fields and d.effect in keys and d.effect.startswith(d.organ + " "), kind
        assert d.weights or d.coverage != 1.0, f"{kind} changes nothing"
    assert {k: d.weights for k, d in study.DEGRADATIONS.items() if d.weights} == {
        f"{organ}_x{f:g}": {organ: f} for organ in ("rectum", "bladder") for f in (0.5, 0.2, 0.1)}
    assert set(study.MUST_FLAG) <= set(study.DEGRADATIONS) and study.DEGRADATIONS["ptv_cov97"].coverage == 0.97
    twin = study.twin_style("rectum_x0.1")
    assert twin.name == "source_rectum_x0.1" and twin.rectum == source.rectum * 0.1 and twin.bladder == source.bladder
    for scale in study.SCALES.values():
        assert set(scale["twins"]) <= set(study.DEGRADATIONS)
    with pytest.raises(FlaxdoseError, match="unknown worse-twin kind 'rectum_x3'"):
        study.make_twin("rectum_x3", None, 0, 5000, 0.5)


def test_the_under_covered_twin_loses_3_percent_of_ptv_d95_and_a_replanned_twin_shares_the_anatomy():
    plan = generate_case("source", 0, 5000, scale=0.5)
    cold = study.make_twin("ptv_cov97", plan, 0, 5000, 0.5)
    d95 = lambda c: dvh_metrics(c.dose, c.mask("PTV"), c.spacing_mm)["D95"]
    assert d95(plan) == pytest.approx(plan.prescription_gy, rel=1e-4)  # every plan is normalized to D95 = Rx
    assert 100 * (1 - d95(cold) / d95(plan)) == pytest.approx(3.0, abs=0.5)
    assert cold.case_id == "source_ptv_cov97_0_5000" and cold.style == "source_ptv_cov97"
    np.testing.assert_array_equal(cold.masks, plan.masks)
    lax = study.make_twin("rectum_x0.1", plan, 0, 5000, 0.5)
    np.testing.assert_array_equal(lax.masks, plan.masks)
    effect = study.twin_effect([plan], [lax], "Rectum Dmean")[0]
    assert effect > 1.0 and lax.case_id == "source_rectum_x0.1_0_5000"


# ---------------------------------------------------------------- members and the report's verdicts
def test_members_follow_the_quick_recipe(tmp_path):
    recipe = quick.get_config()
    cpu = study.member_config(tmp_path, study.SCALES["cpu"], 1)
    for section in ("model", "train"):
        mine, theirs = cpu[section].to_dict(), recipe[section].to_dict()
        differ = {k for k in theirs if mine.get(k) != theirs[k]}
        assert differ <= set(study.SCALES["cpu"][section]), (section, differ)
    assert cpu.data.target_distance == recipe.data.target_distance and cpu.seed == 1
    assert cpu.data.path == str(tmp_path / "data" / "source") and cpu.data.kind == "folder"
    smoke = study.member_config(tmp_path, study.SCALES["smoke"], 0)
    assert smoke.train.steps == 4 and smoke.train.schedule == recipe.train.schedule
    text = study.member_text(cpu)
    assert "signed distance to the PTV" in text and f"PTV weight {recipe.train.target_weight:g}" in text


def numbers(unchanged, rectum, bladder, family_inside):
    """A numbers dict as `evaluate` writes it, for 10 plans, at the default level and 90 %."""
    fam = {"PTV D95, D98": {"n": 100, "inside": family_inside}, "OAR Dmean": {"n": 100, "inside": 92}}
    level = lambda k: {"unchanged_flagged": unchanged, "family_coverage": fam, "twins": {
        "rectum_x0.1": {"flagged": rectum, "flagged_on_organ": rectum, "flags": [True] * rectum + [False] * (10 - rectum)},
        "bladder_x0.1": {"flagged": bladder, "flagged_on_organ": bladder, "flags": [False] * 10}}}
    roc = {"fpr": [0, 1], "tpr": [0, 1], "auc": 0.5, "best_tpr_at_fpr": 0.9, "best_fpr": 0.1, "best_below_level": 0.9}
    return {"n_test": 10, "levels": {"0.9": level(0.9), "0.95": level(0.95)},
            "roc": {"rectum_x0.1": roc, "bladder_x0.1": {**roc, "best_tpr_at_fpr": 0.5}},
            "twin_effect_gy": {"rectum_x0.1": [5.0] * 10, "bladder_x0.1": [1.0] * 10}}


def test_must_hold_verdicts_follow_the_numbers():
    s = {"twins": ("rectum_x0.1", "bladder_x0.1")}
    lines = study.must_hold_lines(numbers(unchanged=1, rectum=8, bladder=7, family_inside=91), s)
    rectum, bladder, cov90, cov95 = lines[2:]
    assert "8/10 = 0.80 flagged, false-flag rate 0.10: **met**" in rectum and "is 0.90: met at another" in rectum
    assert "7/10 = 0.70 flagged" in bladder and "0.70 flagged, false-flag rate 0.10: **not met**" in bladder
    assert "is 0.50: not met at another" in bladder
    assert cov90.endswith(": **met**.")  # 0.91 and 0.92 within 3 points of 0.90
    assert cov95.endswith("**not met** (outside: PTV D95, D98: 0.91).")  # 4 points below 0.95; OAR Dmean 0.92: 3, in
    lines = study.must_hold_lines(numbers(unchanged=2, rectum=10, bladder=10, family_inside=92), s)
    assert "false-flag rate 0.20: **not met**" in lines[2] and lines[5].endswith(": **met**.")  # 0.92: 3 points, in
