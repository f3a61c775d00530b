"""The structures of a plan: contours rasterized (geometric types, planes, points, holes), ROI names
mapped onto the model's structures (aliases, Unicode forms), and the dose coverage of each structure."""

import json
import logging

import dicom_factory as F
import numpy as np
import pydicom
import pytest
from dicom_factory import copy_export, full_dose_truth

from flaxdose.dicom import AliasTable, Roi, fill_polygon, read_rt
from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import dice


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return F.Exports(tmp_path_factory.mktemp("exports"))


def retype(kind):
    def edit(items):
        for item in items:
            item.ContourGeometricType = kind
        return items
    return edit


# ------------------------------------------------------------ contours
def test_fill_polygon_edges_and_holes():
    square = np.array([[1, 1], [4, 1], [4, 3], [1, 3]], float)
    m = fill_polygon(square[:, 0], square[:, 1], 6, 5)
    assert m.sum() == 4 * 3 and m[1:5, 1:4].all()  # closed: boundary centres included
    shifted = fill_polygon(square[:, 0] + 0.5, square[:, 1] + 0.5, 6, 5)
    assert shifted.sum() == 3 * 2  # interior centres only
    ring = fill_polygon(*np.array([[0, 0], [5, 0], [5, 4], [0, 4]], float).T, 6, 5) ^ fill_polygon(
        *np.array([[1.5, 1.5], [3.5, 1.5], [3.5, 2.5], [1.5, 2.5]], float).T, 6, 5)
    assert not ring[2, 2] and not ring[3, 2] and ring[1, 2] and ring[0, 0]


@pytest.mark.parametrize("edit", [lambda items: None, lambda items: [],
                                  lambda items: [F.contour_item([[0.0, -22.0, 11.25]], "POINT")]],
                         ids=["no ContourSequence", "empty ContourSequence", "only a POINT"])
def test_required_roi_without_contours_stops_the_plan(rt_export, tmp_path, edit):
    export = copy_export(rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "BLADDER", edit)
    with pytest.raises(FlaxdoseError, match=r"ROI 'BLADDER' \(Bladder\) has no contours"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    # an ROI the model does not need may be empty
    F.edit_roi(export["struct"], "BLADDER", lambda items: [F.contour_item([[0, -22, 11.25], [1, -22, 11.25],
                                                                           [1, -21, 11.25]])])
    F.edit_roi(export["struct"], "PTV_ring", lambda items: None)
    assert read_rt(export["folder"], structures=("PTV", "Rectum")).mask("Rectum").any()


def test_interpolated_untyped_point_and_open_contours(rt_export, tmp_path, caplog):
    export = copy_export(rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "Box", retype("INTERPOLATED_PLANAR"))
    F.edit_roi(export["struct"], "BLADDER", retype(""))

    def marks(items):  # a POINT in the rectum's hole and an OPEN_PLANAR line across it: they enclose nothing
        z = [float(item.ContourData[2]) for item in items[::2]]
        return items + [F.contour_item([[0.0, 28.0, v]], "POINT") for v in z] + [
            F.contour_item([[-10.0, 28.0, v], [10.0, 28.0, v]], "OPEN_PLANAR") for v in z]

    F.edit_roi(export["struct"], "rectum", marks)
    with caplog.at_level(logging.INFO, logger="flaxdose"):
        case = read_rt(export["folder"], structures=F.STRUCTURES)
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    assert np.array_equal(case.mask("Box"), truth["Box"])  # traced through voxel centres: exact
    for name in ("Bladder", "Rectum"):
        assert dice(case.mask(name), truth[name]) >= 0.97, name
        assert abs(int(case.mask(name).sum()) - int(truth[name].sum())) <= 0.02 * truth[name].sum(), name
    assert not case.mask("Rectum")[20, 28, 15]  # x 0, y 27, z -1.25 mm: the hole stays empty
    notes = " ".join(case.meta["notes"])
    assert "POINT contour(s) set aside" in notes and "OPEN_PLANAR contour(s) set aside" in notes
    assert "without ContourGeometricType read as CLOSED_PLANAR" in notes
    assert "POINT contour(s) set aside" in caplog.text
    F.edit_roi(export["struct"], "BLADDER", retype("CURVED"))
    with pytest.raises(FlaxdoseError, match="ContourGeometricType 'CURVED'"):
        read_rt(export["folder"], structures=F.STRUCTURES)


@pytest.mark.parametrize("has_ct", [False, True])
def test_rois_contoured_on_every_other_slice_fill_the_slices_between(rt_export, rt_export_ct, tmp_path, has_ct):
    export = copy_export(rt_export_ct if has_ct else rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "Patient Outline 1", lambda items: items[::2])  # the other ROIs: every slice
    F.edit_roi(export["struct"], "Box", lambda items: items[1::2])
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)
    zs = F.coords(case.origin_mm, case.spacing_mm, case.shape)[2]
    # the body has the same cross-section on every slice: every slice holds it, none is a hole
    per_slice, true_per_slice = case.mask("Body").sum(axis=(0, 1)), truth["Body"].sum(axis=(0, 1))
    assert (per_slice > 0).all() and (np.abs(per_slice - true_per_slice) <= 0.02 * true_per_slice).all()
    # the box, contoured on every other slice in z -18.75..18.75: each plane is a 5 mm slab
    box_planes = F.ct_z()[(F.ct_z() >= F.BOX_Z[0]) & (F.ct_z() <= F.BOX_Z[1])][1::2]
    slab = np.abs(zs[:, None] - box_planes[None, :]).min(axis=1) <= 2.5 + 1e-6
    expected = truth["Box"][:, :, [12]] & slab[None, None, :]  # z -8.75 mm: the box's cross-section
    assert np.array_equal(case.mask("Box"), expected)
    assert case.meta["structures"]["Box"]["slab_mm"] == 5.0


def test_one_point_contour_keeps_its_voxel_and_a_subvoxel_structure_is_refused(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p")
    F.edit_roi(export["struct"], "Box", lambda items: items + [F.contour_item([[0.0, 0.0, 31.25]])])
    case = read_rt(export["folder"], structures=F.STRUCTURES)
    expected = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape)["Box"]
    expected[20, 19, 28] = True  # x = -60 + 3 * 20, y = -57 + 3 * 19, z = -38.75 + 2.5 * 28: that voxel centre
    assert np.array_equal(case.mask("Box"), expected)
    # a PTV of 1 mm square between the dose grid's voxel centres (0 and 3 mm): no voxel holds it
    square = [[1.0, 1.0, 1.25], [2.0, 1.0, 1.25], [2.0, 2.0, 1.25], [1.0, 2.0, 1.25]]
    F.edit_roi(export["struct"], "PTV_6000", lambda items: [F.contour_item(square)])
    with pytest.raises(FlaxdoseError, match="smaller than a voxel"):
        read_rt(export["folder"], structures=F.STRUCTURES)


# ------------------------------------------------------------ ROI names and aliases
def test_structure_aliases(tmp_path):
    rois = [Roi(1, "PTV_7920"), Roi(2, "PTV_5400"), Roi(3, "Blase"), Roi(4, "Rectum"), Roi(5, "Femur_L"),
            Roi(6, "femoral head rt"), Roi(7, "Skin", "EXTERNAL"), Roi(8, "PTV_ring")]
    with pytest.raises(FlaxdoseError) as info:
        AliasTable().match(["PTV", "Bladder"], rois[:2] + [Roi(3, "Harnblase")])
    message = str(info.value)
    assert "PTV_7920" in message and "PTV_5400" in message and "Harnblase" in message and "--aliases" in message
    path = tmp_path / "aliases.json"
    path.write_text(json.dumps({"PTV": ["ptv 7920"], "Bladder": ["HARNBLASE"]}))
    table = AliasTable.from_file(path)
    found = table.match(["PTV", "Bladder", "Rectum", "Femur_Head_L", "Femur_Head_R", "Body"],
                        rois + [Roi(9, "Harnblase")])
    assert {k: v.number for k, v in found.items()} == {
        "PTV": 1, "Bladder": 9, "Rectum": 4, "Femur_Head_L": 5, "Femur_Head_R": 6, "Body": 7}
    assert AliasTable().match(["Bladder"], rois)["Bladder"].number == 3  # built-in alias "Blase"
    # one PTV-like name besides helper structures: the prefix rule finds it
    assert AliasTable().match(["PTV"], [Roi(1, "PTV_prostate_78"), Roi(2, "PTV_ring")])["PTV"].number == 1
    path.write_text("[1, 2]")
    with pytest.raises(FlaxdoseError, match="alias file"):
        AliasTable.from_file(path)


def test_missing_roi_lists_names(exports, tmp_path):
    with pytest.raises(FlaxdoseError, match="Patient Outline 1") as info:
        read_rt(exports["HFS"]["folder"], structures=("PTV", "Prostate"))
    assert "Prostate: no ROI matches" in str(info.value)


NFC_NAME, NFD_NAME = "Harnblase \u00fcberf\u00fcllt", "Harnblase u\u0308berfu\u0308llt"  # as macOS writes it


@pytest.mark.parametrize("roi_name,charset,alias", [(NFC_NAME, "ISO_IR 100", NFD_NAME),
                                                    (NFD_NAME, "ISO_IR 192", NFC_NAME)], ids=["alias NFD", "ROI NFD"])
def test_roi_aliases_match_in_any_unicode_normalization_form(rt_export, tmp_path, roi_name, charset, alias):
    assert roi_name != alias and len(NFD_NAME) == len(NFC_NAME) + 2  # two combining diaereses
    export = copy_export(rt_export, tmp_path / "p")
    F.rename_roi(export["struct"], "BLADDER", roi_name, charset)
    assert pydicom.dcmread(export["struct"]).StructureSetROISequence[1].ROIName == roi_name  # stored as given
    with pytest.raises(FlaxdoseError, match="Bladder: no ROI matches"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    aliases_file = tmp_path / "aliases.json"
    aliases_file.write_text('{"Bladder": ["%s"]}' % alias, encoding="utf-8")
    case = read_rt(export["folder"], structures=F.STRUCTURES, aliases=AliasTable.from_file(aliases_file))
    assert case.meta["structure_rois"]["Bladder"] == roi_name
    truth = F.truth_masks(case.origin_mm, case.spacing_mm, case.shape, ["Bladder"])["Bladder"]
    assert dice(case.mask("Bladder"), truth) >= 0.97


@pytest.mark.parametrize("alias", ["\uff28\uff41\uff52\uff4e\uff42\uff4c\uff41\uff53\uff45",  # full-width letters
                                   "Harn\u200bblase"], ids=["full-width", "zero-width space"])
def test_roi_aliases_match_across_compatibility_forms_and_invisible_characters(rt_export, tmp_path, alias):
    export = copy_export(rt_export, tmp_path / "p")
    F.rename_roi(export["struct"], "BLADDER", "Harnblase")
    aliases_file = tmp_path / "aliases.json"
    aliases_file.write_text('{"Bladder": ["%s"]}' % alias, encoding="utf-8")
    case = read_rt(export["folder"], structures=F.STRUCTURES, aliases=AliasTable.from_file(aliases_file))
    assert case.meta["structure_rois"]["Bladder"] == "Harnblase"


# ------------------------------------------------------------ dose coverage
def test_a_cropped_dose_grid_is_reported_and_refused_below_the_threshold(rt_export, tmp_path, caplog):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", z_max=21.5)  # the top of the bladder (z up to 26 mm) has no dose
    with pytest.raises(FlaxdoseError, match=r"Bladder \(ROI 'BLADDER'\): only 9\d\.\d % .* has dose"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    with caplog.at_level(logging.WARNING, logger="flaxdose"):
        case = read_rt(export["folder"], structures=F.STRUCTURES, min_coverage=0.8)
    truth, _, zs = full_dose_truth(["Bladder", "PTV"])
    expected = truth["Bladder"][:, :, zs <= 21.5].sum() / truth["Bladder"].sum()
    facts = case.meta["structures"]
    assert 0.8 < expected < 0.99 and abs(facts["Bladder"]["coverage"] - expected) <= 0.01
    assert facts["PTV"]["coverage"] == 1.0 and abs(facts["PTV"]["voxels"] - truth["PTV"].sum()) <= 0.02 * truth[
        "PTV"].sum()
    assert "Bladder:" in caplog.text and any("Bladder" in w for w in case.meta["warnings"])


def test_the_body_coverage_is_recorded_not_enforced(rt_export, tmp_path):
    export = copy_export(rt_export, tmp_path / "p", skip=("RD.dcm",))
    F.write_dose(export, "RD.dcm", x_range=(-45.0, 45.0))  # the body is 116 mm wide, the femoral heads reach 51
    with pytest.raises(FlaxdoseError, match="Femur_Head_L"):
        read_rt(export["folder"], structures=F.STRUCTURES)
    case = read_rt(export["folder"], structures=("PTV", "Bladder", "Rectum", "Body"))
    truth, xs, _ = full_dose_truth(["Body"])
    expected = truth["Body"][np.abs(xs) <= 45.0].sum() / truth["Body"].sum()
    assert abs(case.meta["structures"]["Body"]["coverage"] - expected) <= 0.01 and expected < 0.9
    assert not case.meta["warnings"]
