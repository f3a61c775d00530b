"""DICOM-RT in and out: CT + RTSTRUCT + RTDOSE (+ RTPLAN) -> `Case`, datasets of them, and RTDOSE export.

Modules: `geometry` (orientation, LPS layout, resampling), `contours` (rasterizing),
`files` (pydicom access, scanning, grouping into plans), `readers` (CT, RTDOSE, RTPLAN,
RTSTRUCT, whole plans), `importer` (folders of exports -> a dataset), `rtdose` (the RTDOSE
writer), `structures` (ROI-name aliases). See docs/dicom.md.
"""

from flaxdose.data.grid import MODEL_SHAPE, MODEL_SPACING_MM, Grid
from flaxdose.dicom.contours import fill_polygon, rasterize
from flaxdose.dicom.files import DicomFile, PlanFiles, group_plans, scan
from flaxdose.dicom.geometry import resample
from flaxdose.dicom.importer import ImportSummary, import_dicom
from flaxdose.dicom.readers import (
    CtSeries,
    StructureSet,
    read_ct,
    read_dose,
    read_plan,
    read_prescription,
    read_rt,
    read_structure_set,
)
from flaxdose.dicom.rtdose import dose_grid_scaling, write_rtdose
from flaxdose.dicom.structures import AliasTable, Roi

__all__ = [
    "MODEL_SHAPE", "MODEL_SPACING_MM", "AliasTable", "CtSeries", "DicomFile", "Grid", "ImportSummary", "PlanFiles",
    "Roi", "StructureSet", "dose_grid_scaling", "fill_polygon", "group_plans", "import_dicom", "rasterize",
    "read_ct", "read_dose", "read_plan", "read_prescription", "read_rt", "read_structure_set", "resample", "scan",
    "write_rtdose",
]
