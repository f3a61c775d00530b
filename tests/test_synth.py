"""Synthetic prostate VMAT data: anatomy, style signatures (issue 3's "must hold"), datasets, CLI.

The style assertions run on 8 shared anatomies planned in all five styles at scale 0.5
(60 x 60 x 32), generated once per module; docs/synthetic_data.md has the full-size numbers.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage

from flaxdose.data import Dataset
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dvh_metrics
from flaxdose.synthetic import anatomy
from flaxdose.synthetic import generator as synth

SCALE = 0.5
N_ANATOMIES = 8


@pytest.fixture(scope="module")
def planned():
    """The same 8 (test-range) anatomies planned in every style."""
    return {
        style: synth.generate_cases(style, N_ANATOMIES, seed=0, scale=SCALE, start=synth.TEST_ANATOMY_BASE)
        for style in synth.STYLES
    }


@pytest.fixture(scope="module")
def report(planned):
    return synth.style_report(planned)


# ------------------------------------------------------------------ grid and anatomy
def test_grid_scales():
    full = anatomy.grid_for_scale(1.0)
    assert full.shape == (120, 120, 64) and full.spacing_mm == (4.0, 4.0, 3.0)
    half = anatomy.grid_for_scale(0.5)
    assert half.shape == (60, 60, 32) and half.spacing_mm == (8.0, 8.0, 6.0)
    for bad in (0.25, 0.3, 0.75, 0.0, -1.0, 3.0, "big"):
        with pytest.raises(FlaxdoseError, match="scale"):
            anatomy.grid_for_scale(bad)


def test_anatomy_is_realistic_and_varies():
    grid = anatomy.grid_for_scale(SCALE)
    cc = np.prod(grid.spacing_mm) / 1000
    volumes = []
    for index in range(12):
        a = anatomy.sample_anatomy(3, index)
        ptv, bladder, rectum, fem_l, fem_r, body = anatomy.structure_masks(a, grid)
        volumes.append((ptv.sum() * cc, bladder.sum() * cc))
        assert 35 < ptv.sum() * cc < 200 and 50 < bladder.sum() * cc < 550
        c = {name: np.argwhere(m).mean(axis=0) for name, m in zip("pbrLR", (ptv, bladder, rectum, fem_l, fem_r))}
        assert c["b"][2] > c["p"][2] and c["b"][1] < c["p"][1]  # bladder superior and anterior of the PTV
        assert (bladder & ptv).any()  # ... and overlapping it
        touching = ndimage.binary_dilation(ptv) & rectum  # within one voxel (8 mm) of the PTV
        assert c["r"][1] > c["p"][1] and touching.any()  # rectum posterior, touching the PTV
        assert c["L"][0] > c["p"][0] > c["R"][0]  # x runs right -> left
        for organ in (ptv, bladder, rectum, fem_l, fem_r):
            assert organ.any() and not (organ & ~body).any()
    assert len({round(v, 3) for v, _ in volumes}) == len(volumes)  # no two patients alike


def test_anatomy_depends_only_on_seed_and_index(planned):
    grid = anatomy.grid_for_scale(SCALE)
    same = anatomy.structure_masks(anatomy.sample_anatomy(0, 7), grid)
    np.testing.assert_array_equal(same, anatomy.structure_masks(anatomy.sample_anatomy(0, 7), grid))
    assert (same != anatomy.structure_masks(anatomy.sample_anatomy(1, 7), grid)).any()
    assert (same != anatomy.structure_masks(anatomy.sample_anatomy(0, 8), grid)).any()
    for style in synth.STYLES:  # every style plans the same patients
        for case, ref in zip(planned[style], planned["source"]):
            np.testing.assert_array_equal(case.masks, ref.masks)
            assert case.meta["anatomy_index"] == ref.meta["anatomy_index"]


# ------------------------------------------------------------------ the "must hold"
@pytest.mark.parametrize("style", synth.STYLES)
def test_every_style_is_a_clinical_plan(planned, style):
    for case in planned[style]:
        ptv = dvh_metrics(case.dose, case.mask("PTV"), case.spacing_mm)
        rx = case.prescription_gy
        assert rx == synth.PRESCRIPTION_GY and case.style == style and case.shape == (60, 60, 32)
        assert abs(ptv["D95"] - rx) <= 0.01 * rx
        assert ptv["D2"] <= 1.10 * rx
        assert not case.dose[~case.mask("Body")].any()
        assert case.dose.max() > 0.9 * rx and case.dose.dtype == np.float32


def test_internal_c_trades_femoral_heads_for_bladder_and_rectum(report):
    c = report["internal_c"]
    assert c["Femoral heads vs source"] >= 1.25
    assert c["Rectum vs source"] <= 0.90 and c["Bladder vs source"] <= 0.90


@pytest.mark.parametrize("style", ["internal_a", "internal_b"])
def test_internal_a_b_spare_the_rectum_not_the_femoral_heads(report, style):
    row = report[style]
    assert 0.75 <= row["Rectum vs source"] <= 0.95
    assert 0.90 <= row["Femoral heads vs source"] <= 1.10  # issue 12: within +-10 % of source


def femoral_mean(case):
    return np.mean([dvh_metrics(case.dose, case.mask(f"Femur_Head_{s}"), case.spacing_mm)["Dmean"] for s in "LR"])


def test_ptv_dose_differs_by_style(planned):
    """Source has a hot PTV core (D2 ~105 %), external a flat PTV dose (D2 <= ~102 %)."""
    d2 = {style: np.array([dvh_metrics(c.dose, c.mask("PTV"), c.spacing_mm)["D2"] / c.prescription_gy
                           for c in planned[style]]) for style in ("source", "external")}
    assert 1.04 <= d2["source"].mean() <= 1.065
    assert d2["external"].mean() <= 1.02 and d2["external"].max() <= 1.025
    assert (d2["source"] - d2["external"] >= 0.015).all()  # the same patient, hotter in source style


def entrance_dose(case, gantry_deg, radius_mm):
    """Dose radius_mm upstream of the PTV centroid on the beam axis (axial slice), by hand."""
    ptv = case.mask("PTV")
    cx, cy, cz = np.argwhere(ptv).mean(axis=0)
    t = np.deg2rad(gantry_deg)
    x, y = cx + np.sin(t) * radius_mm / case.spacing_mm[0], cy - np.cos(t) * radius_mm / case.spacing_mm[1]
    return ndimage.map_coordinates(case.dose[:, :, int(round(cz))], [[x], [y]], order=1)[0]


def test_external_spikes_are_the_same_directions_for_every_patient(planned):
    """The anterior (0) and lateral (93.9, 266.1 degree) beams of the 23 reach out further than the
    beams at least 25 degrees from them, in every external plan, and not in the source plans."""
    beams = np.arange(23) * 360 / 23
    spikes = beams[[0, 6, 17]]
    off = np.min(np.abs((beams[:, None] - spikes[None] + 180) % 360 - 180), axis=1)
    bath = beams[off >= 25]
    for ext, src in zip(planned["external"], planned["source"]):
        contrast = [np.mean([entrance_dose(c, a, 80.0) for a in spikes]) / np.mean([entrance_dose(c, a, 80.0) for a in bath])
                    for c in (ext, src)]
        assert contrast[0] >= 1.10 and contrast[0] - contrast[1] >= 0.15, (ext.case_id, contrast)
        assert synth.spike_contrast(ext) == pytest.approx(contrast[0], rel=1e-4)


def test_external_is_predictable_from_a_source_plan(report, planned):
    """The oracle (the same patient's source plan) scores >= 0.75 at every isodose level, and the
    femoral-head dose varies across patients at most twice as much as in source plans."""
    ext = report["external"]
    for level in range(10, 101, 10):
        assert ext[f"Dice vs source dice_{level}"] >= 0.75, level
    assert ext["Dice vs source, worst level"] >= 0.75
    sd = {s: np.std([femoral_mean(c) for c in planned[s]], ddof=1) for s in ("source", "external")}
    assert sd["external"] <= 2 * sd["source"]
    assert ext["femoral SD vs source"] == pytest.approx(sd["external"] / sd["source"], rel=1e-4)


def test_external_low_dose_is_lobed(report):
    assert report["external"]["lobedness vs source"] >= 1.4


def test_styles_differ_but_stay_alike(report):
    for style in synth.STYLES[1:]:
        assert report[style]["n_shared"] == N_ANATOMIES
        assert 0.70 <= report[style]["Dice vs source"] <= 0.95, style
    assert report["source"]["Dice vs source"] == 1.0


def test_lobedness_measures_spikes(planned):
    case = planned["source"][0]
    spiky = case.dose.copy()
    k = int(round(np.argwhere(case.mask("PTV")).mean(axis=0)[2]))
    cx = int(round(np.argwhere(case.mask("PTV")).mean(axis=0)[0]))
    spiky[:, :, k] = np.where(case.mask("Body")[:, :, k], case.dose[:, :, k], 0)
    spiky[: cx + 1, :, k] = np.maximum(spiky[: cx + 1, :, k], 0.5 * case.prescription_gy * case.mask("Body")[: cx + 1, :, k])
    spiked = case.replace(dose=spiky)  # a lateral half-plane raised above 20 %: a one-sided lobe
    assert synth.isodose_lobedness(spiked) > 1.3 * synth.isodose_lobedness(case)


# ------------------------------------------------------------------ datasets and bad input
def test_ensure_dataset_caches_and_is_byte_identical(tmp_path, planned):
    a = synth.ensure_dataset(tmp_path / "a", "source", 1, 1, seed=0, scale=SCALE, progress=False)
    ds = Dataset.open(a)
    assert ds.splits == {"train": ["source_0_0000"], "test": [f"source_0_{synth.TEST_ANATOMY_BASE:04d}"]}
    assert ds.manifest["synth"]["scale"] == SCALE and ds.manifest["synth"]["prescription_gy"] == 70.0
    test_case = ds.load(ds.split("test")[0])
    np.testing.assert_array_equal(test_case.dose, planned["source"][0].dose)  # deterministic generation
    stamp = (a / "manifest.json").stat().st_mtime_ns
    assert synth.ensure_dataset(a, "source", 1, 1, seed=0, scale=SCALE, progress=False) == a
    assert (a / "manifest.json").stat().st_mtime_ns == stamp  # reused, not regenerated

    b = synth.ensure_dataset(tmp_path / "b", "source", 1, 1, seed=0, scale=SCALE, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel

    # Other parameters at the same folder: refused, untouched, unless overwrite.
    with pytest.raises(FlaxdoseError, match="other data"):
        synth.ensure_dataset(a, "source", 2, 1, seed=0, scale=SCALE, progress=False)
    assert (a / "manifest.json").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folders left behind


def test_worker_processes_plan_the_same_bytes(planned):
    """workers > 1 (the GPU scale's data stage) plans in CPU processes: the same plans, in order."""
    cases = list(synth.iter_cases("source", 2, seed=0, scale=SCALE, start=synth.TEST_ANATOMY_BASE, workers=2))
    assert [c.case_id for c in cases] == [c.case_id for c in planned["source"][:2]]
    for mine, ref in zip(cases, planned["source"]):
        np.testing.assert_array_equal(mine.dose, ref.dose)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(FlaxdoseError, match="internal_c"):  # lists the styles
        synth.generate_cases("conformal", 2, seed=0)
    for n in (0, -3, 1.5):
        with pytest.raises(FlaxdoseError, match=">= 1"):
            synth.generate_cases("source", n, seed=0)
    with pytest.raises(FlaxdoseError, match="scale"):
        synth.generate_cases("source", 1, seed=0, scale=0.3)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FlaxdoseError, match="overwrite"):
        synth.ensure_dataset(tmp_path, "source", 1, 1, scale=SCALE)
    # --overwrite replaces an earlier dataset only, never someone's notes (refused before any case is made)
    with pytest.raises(FlaxdoseError, match=r"not an earlier flaxdose dataset .*notes.txt.*empty the folder yourself"):
        synth.ensure_dataset(tmp_path, "source", 1, 1, scale=SCALE, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"


def test_cli_report_and_errors(tmp_path):
    (tmp_path / "study" / "source").mkdir(parents=True)  # an empty folder is fine
    synth.ensure_dataset(tmp_path / "study" / "source", "source", 1, 1, seed=0, scale=SCALE, progress=False)
    proc = subprocess.run([sys.executable, "-m", "flaxdose.synth", "--report", str(tmp_path / "study")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1].startswith("source") and "100.0" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "flaxdose.synth", "--style", "nope", "--n", "2", "--out", str(tmp_path / "x")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2 and "internal_c" in proc.stderr and not (tmp_path / "x").exists()


def test_paper_splits_match_table_1():
    assert synth.STYLES == ("source", "internal_a", "internal_b", "internal_c", "external")
    assert synth.PAPER_SPLITS == {
        "source": (108, 10), "internal_a": (29, 5), "internal_b": (14, 2), "internal_c": (17, 3), "external": (20, 40),
    }
    assert json.loads(json.dumps(synth.PAPER_SPLITS)) == {k: list(v) for k, v in synth.PAPER_SPLITS.items()}
