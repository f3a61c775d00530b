"""DVH metric specs as physicists write them (issue 30): parsed, and valued on volumes whose answer is known by hand."""

import numpy as np
import pytest

from flaxdose.errors import FlaxdoseError
from flaxdose.metrics import PROSTATE_METRIC_SPECS, compare_specs, metric_value, parse_metric_spec, spec_metrics

# 100 voxels of 1 x 1 x 1 mm (0.001 cc each) with doses 0, 1, ..., 99 Gy; prescription 80 Gy
DOSE = np.arange(100, dtype=np.float64).reshape(10, 10, 1)
MASK = np.ones(DOSE.shape, bool)
RX = 80.0


@pytest.mark.parametrize("spec, expected", [
    ("Rectum V70Gy[%]", 30.0),  # 70..99 Gy: 30 of 100 voxels
    ("Rectum V70Gy", 30.0),
    ("Bladder V65Gy[cc]", 0.035),  # 35 voxels x 0.001 cc
    ("PTV V95%", 24.0),  # >= 76 Gy: 76..99
    ("PTV D95", 5.0),  # the 95th-hottest voxel: 5 Gy
    ("PTV D95%", 5.0),
    ("PTV D95[%]", 100 * 5.0 / RX),  # in % of the prescription
    ("PTV D2", 98.0),
    ("PTV Dmax[0.03cc]", 70.0),  # 0.03 cc = 30 voxels of 0.001 cc: the 30th-hottest voxel
    ("PTV D0.005cc", 95.0),  # 5 voxels
    ("PTV Dmean", 49.5),
    ("PTV Dmean[%]", 100 * 49.5 / RX),
    ("PTV Dmax", 99.0),
    ("PTV Dmin", 0.0),
])
def test_metric_values_by_hand(spec, expected):
    assert metric_value(spec, DOSE, MASK, (1.0, 1.0, 1.0), RX) == pytest.approx(expected)


def test_specs_parse_refuse_and_compare():
    spec = parse_metric_spec("Femur_Head_L  V50Gy[%]")
    assert (spec.structure, spec.kind, spec.level, spec.level_unit, spec.unit) == ("Femur_Head_L", "V", 50.0, "Gy", "%")
    assert parse_metric_spec("PTV D95[%]").metric == "D95[%]"
    for bad in ("Rectum", "Rectum V70", "PTV D95Gy", "PTV D120", "PTV Dmean[cc]"):
        with pytest.raises(FlaxdoseError, match="metric spec"):
            parse_metric_spec(bad)
    with pytest.raises(FlaxdoseError, match="prescription"):
        metric_value("PTV D95[%]", DOSE, MASK, (1, 1, 1), None)
    assert np.isnan(metric_value("PTV D95", DOSE, np.zeros_like(MASK), (1, 1, 1), RX))
    masks = np.stack([MASK, DOSE >= 50])
    values = spec_metrics(DOSE, masks, ("PTV", "Rectum"), (1, 1, 1), RX, PROSTATE_METRIC_SPECS)
    assert values["Rectum V50Gy[%]"] == 100.0 and "Bladder Dmean" not in values  # no bladder: left out
    with pytest.raises(FlaxdoseError, match="no structure 'Bladder'"):
        spec_metrics(DOSE, masks, ("PTV", "Rectum"), (1, 1, 1), RX, ["Bladder Dmean"], missing="raise")
    rows = compare_specs(DOSE, DOSE + 1.0, masks, ("PTV", "Rectum"), (1, 1, 1), RX, ["PTV Dmean", "Rectum V70Gy[%]"])
    assert [(r["metric"], r["difference"]) for r in rows] == [("Dmean", 1.0), ("V70Gy[%]", pytest.approx(2.0))]
