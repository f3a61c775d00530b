"""DICOM-RT in and out: CT + RTSTRUCT + RTDOSE (+ RTPLAN) -> `Case`, datasets of them, and RTDOSE export.

Modules: `geometry` (orientation, LPS layout, resampling), `contours` (rasterizing),
`files` (pydicom access, scanning, grouping into plans), `damage` (which files are
damaged and why, and the plans they stop), `dose` (RTDOSE, RTPLAN fractions,
beams and prescription, the plan dose), `readers` (CT, RTSTRUCT, whole plans as
`ReadOptions` say), `importer` (folders of exports -> a dataset and its report), `rtdose`
(the RTDOSE writer), `structures` (ROI-name aliases). See docs/dicom.md.
"""

from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM, Grid
from flaxdose.dicom.contours import RoiContours, fill_polygon, rasterize
from flaxdose.dicom.dose import PlanDose, RtDose, RtPlan, plan_dose, read_dose, read_prescription, read_rtplan
from flaxdose.dicom.files import DicomFile, Grouping, PlanFiles, group_plans, scan
from flaxdose.dicom.geometry import resample
from flaxdose.dicom.importer import REPORT_CSV, ImportSummary, import_dicom, patient_splits
from flaxdose.dicom.readers import (
    MIN_COVERAGE,
    CtSeries,
    ReadOptions,
    StructureSet,
    read_ct,
    read_plan,
    read_rt,
    read_structure_set,
)
from flaxdose.dicom.rtdose import dose_grid_scaling, write_rtdose
from flaxdose.dicom.structures import AliasTable, Roi, is_body

__all__ = [
    "MIN_COVERAGE", "MODEL_SHAPE", "MODEL_SPACING_MM", "REPORT_CSV", "AliasTable", "CtSeries", "DicomFile", "Grid",
    "Grouping", "ImportSummary", "PlanDose", "PlanFiles", "ReadOptions", "Roi", "RoiContours", "RtDose", "RtPlan",
    "StructureSet", "dose_grid_scaling", "fill_polygon", "group_plans", "import_dicom", "is_body", "patient_splits",
    "plan_dose", "rasterize", "read_ct", "read_dose", "read_plan", "read_prescription", "read_rt", "read_rtplan",
    "read_structure_set", "resample", "scan", "write_rtdose",
]
