"""Plan QA with predicted DVH bands: an ensemble of trained models, calibrated bands, flags, a report.

Knowledge-based plan QA compares a plan's DVH metrics with what models trained on good plans
predict for the same anatomy. The prediction is an `Ensemble` of trained models (workdirs: one
setting trained with different seeds, or a sweep's runs of one setting), and every DVH metric
of `flaxdose.metrics.plan_dvh_metrics` (PTV Dmean/D2/D95/D98, OAR Dmean/D2) gets a band.

The band of one metric of one case, and where each number comes from:

- the members: each member's metric on its own predicted dose, x_1..x_M; their mean mu and
  variance v (ddof=1; 0 with one member): the ensemble's spread, from this case alone;
- a `Calibration` from held-out plans of the model's style (a calibration split: neither the
  models' training plans nor the cases whose coverage is reported): over its n cases the
  residuals r_i = reference_i - mu_i, their mean b (the model's bias) and variance s^2 (ddof=1),
  and the members' mean variance vbar = mean_i v_i;
- centre = mu + b, sigma^2 = lambda v + e^2 + s^2 / n, band = centre -/+ t_{n-1}((1 + level) / 2) sigma,
  with lambda = min(1, s^2 / vbar) and e^2 = max(s^2 - vbar, 0): the members' spread, scaled
  down where it overstates the held-out error (lambda < 1) and widened by a constant where it
  understates it (e^2 > 0), so that lambda v + e^2 averages s^2 over the calibration cases.

On average the band is therefore the textbook normal prediction interval for one new
observation when the mean and the variance are estimated from n samples, mean +- t_{n-1} s
sqrt(1 + 1/n) (Student t with n - 1 degrees of freedom; e.g. Hahn & Meeker, *Statistical
Intervals*, 1991, ch. 4); per case it is wider where the members disagree more than usual. It
assumes roughly normal residuals and a plan exchangeable with the calibration plans, which is
why `coverage` exists: the fraction of reference plans inside their bands on separate
held-out cases. No band is calibrated without that number (docs/plan_qa.md).

Flags (`check_plan`): an OAR metric (Dmean, D2) above the band's upper edge by more than
`tolerance_gy` (the OAR receives clearly more than predicted: possible further sparing), or a
target coverage metric (D95, D98) below the lower edge by more than `tolerance_gy`.
``excess_gy`` is that distance (negative inside the band), ``excess_sigma`` the same in units of
sigma; plans are ranked by their largest ``excess_gy`` (`rank_plans`). Other target metrics
(Dmean, D2) are reported against their bands but never flagged.

Modules: `ensemble` (members and their predictions), `calibration` (bands from held-out plans),
`check` (flags, ranks, coverage), `roc` (a per-plan flag score that puts every band level on one axis,
ROC curves and their area over it), `plans` (plans from datasets and DICOM), `report`, and `assess` (the
style check before adapting a model).
"""

from flaxdose.planqa.calibration import (  # noqa: F401
    CALIBRATION_FORMAT,
    MIN_CALIBRATION_PLANS,
    Band,
    Calibration,
    MetricCalibration,
    calibrate,
    calibrate_predictions,
    check_held_out,
    check_level,
    few_plans,
)
from flaxdose.planqa.check import (  # noqa: F401
    COVERAGE_METRICS,
    DEFAULT_LEVEL,
    DEFAULT_TOLERANCE_GY,
    FINDINGS,
    ROW_COLUMNS,
    QAResult,
    check_plan,
    coverage,
    flag_rule,
    rank_plans,
    run_qa,
)
from flaxdose.planqa.ensemble import (  # noqa: F401
    Ensemble,
    EnsemblePrediction,
    case_metrics,
    check_same_anatomy,
    expand_workdirs,
    metric_key,
    split_key,
)
from flaxdose.planqa.plans import (  # noqa: F401
    load_plans,
    on_plan_grid,
    read_dicom_plan,
    read_dicom_plans,
)
from flaxdose.planqa.report import (  # noqa: F401
    CLINICAL_COLUMNS,
    clinical_rows,
    markdown,
    summary,
    write_report,
    write_rows_csv,
)
from flaxdose.planqa.roc import (  # noqa: F401
    flag_scores,
    level_threshold,
    operating_point,
    roc_auc,
    roc_curve,
    threshold_level,
)
