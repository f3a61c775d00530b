"""Evaluation of predicted doses against reference doses: `scoring` (per-case Dice and DVH errors),
`summary` (statistics over cases and paired t-tests), `report` (CSV, Markdown and figures), `openkbp`
(the OpenKBP challenge's dose and DVH scores of models, its submissions and report).
"""

from flaxdose.evaluation.report import (  # noqa: F401
    FIGURE_CAPTIONS,
    figure_lines,
    markdown_table,
    report_notes,
    write_csv,
    write_report,
)
from flaxdose.evaluation.scoring import (  # noqa: F401
    DICE_KEYS,
    ERROR_SUFFIXES,
    ID_COLUMNS,
    Evaluation,
    check_same_grid,
    evaluate_case,
    evaluate_models,
    evaluate_predictions,
    load_references,
    split_ids,
    unique_names,
)
from flaxdose.evaluation.summary import (  # noqa: F401
    describe,
    dice_mean,
    empty_structures,
    level_means,
    level_range,
    mean_dvh_error_pct,
    metric_columns,
    paired_ttest,
    summarize,
    ttest,
)
