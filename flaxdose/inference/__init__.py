"""Inference: trained models that predict dose, and where they read from.

`predictor` (the `Model`, sliding windows; from a trained `flaxdose.run.Run` or a config), `spacing`
(the voxel-spacing policy), `dicom_plans` (clinical DICOM in, RTDOSE and DVH tables out), `baseline`
(the distance-to-target model), `package` (self-contained model packages).
"""

from flaxdose.inference.dicom_plans import (  # noqa: F401
    KEY_METRICS,
    METRIC_COLUMNS,
    PLAN_FIGURE,
    PLAN_METRICS_CSV,
    RTDOSE_NAME,
    SUMMARY_CSV,
    DicomPlan,
    PlanResult,
    case_metric_rows,
    export_plan_rtdose,
    export_rtdose,
    find_dicom_plans,
    grid_name,
    missing_dose_reason,
    one_dicom_plan,
    plan_line,
    predict_dicom,
    predict_dicom_folder,
    predict_dicom_patient,
    read_dicom_case,
    resolve_rtdose_path,
    rtdose_case,
    write_metric_csv,
    write_summary,
)
from flaxdose.inference.predictor import (  # noqa: F401
    IMPLAUSIBLE_MAX_RELATIVE,
    PLAUSIBLE_PRESCRIPTION_GY,
    Model,
    gaussian_weights,
    implausible,
    make_predict_fn,
    predict_dataset,
    sliding_window,
    window_starts,
)
from flaxdose.inference.spacing import (  # noqa: F401
    SPACING_TOLERANCE,
    accepted_spacing,
    check_spacing,
    describe_spacing,
    dicom_grid,
    field_of_view_shape,
    spacing_fits,
    spacing_fixes,
    synthetic_scale,
)
from flaxdose.run import SPACING_KEY, spacing_record  # noqa: F401  (a trained run's record, read by inference)
