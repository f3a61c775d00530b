"""The OpenKBP challenge (Babier et al., Med Phys 2021) as data: `format` (its files, axis order,
patients, submissions), `conversion` (patients -> a flaxdose dataset) and `grids` (coarser training
grids and back, crop boxes). Predicting and scoring models on it is `flaxdose.evaluation.openkbp`;
the CLI face is `python -m flaxdose.convert_openkbp`. See docs/openkbp.md.
"""

from flaxdose.openkbp.conversion import convert_openkbp
from flaxdose.openkbp.format import (
    CT_OFFSET,
    OPENKBP_OARS,
    OPENKBP_SHAPE,
    OPENKBP_STRUCTURES,
    OPENKBP_TARGETS,
    SPLIT_FOLDERS,
    TARGET_PRESCRIPTION_GY,
    check_target_dose,
    find_patients,
    from_openkbp,
    read_openkbp_patient,
    read_sparse_csv,
    to_openkbp,
    write_openkbp_dose,
    write_submission,
)
from flaxdose.openkbp.grids import (
    check_factor,
    crop_box,
    dataset_downsample,
    downsample_case,
    training_downsample,
    upsample_dose,
)

__all__ = [
    "CT_OFFSET", "OPENKBP_OARS", "OPENKBP_SHAPE", "OPENKBP_STRUCTURES", "OPENKBP_TARGETS", "SPLIT_FOLDERS",
    "TARGET_PRESCRIPTION_GY", "check_factor", "check_target_dose", "convert_openkbp", "crop_box", "dataset_downsample",
    "downsample_case", "find_patients", "from_openkbp", "read_openkbp_patient", "read_sparse_csv", "to_openkbp",
    "training_downsample", "upsample_dose", "write_openkbp_dose", "write_submission",
]
