"""Hand-made plan-QA inputs shared by the plan-QA tests: plans of one dose everywhere, ensemble
predictions whose members give fixed values for every DVH metric."""

import numpy as np

from flaxdose import planqa
from flaxdose.metrics import plan_dvh_metrics


def uniform_plan(case, dose_gy, case_id=None):
    """The case with the same dose everywhere: every DVH metric of every structure equals dose_gy."""
    return case.replace(dose=np.full(case.shape, dose_gy, np.float32), case_id=case_id or case.case_id)


def fixed_prediction(case, member_values):
    """An EnsemblePrediction whose members give `member_values` for every metric (hand-made)."""
    keys = plan_dvh_metrics(case.dose, case.masks, case.structures, case.spacing_mm, targets=case.targets)
    return planqa.EnsemblePrediction(case, np.zeros((len(member_values), *case.shape), np.float32),
                                     {k: np.array(member_values, float) for k in keys})
