"""Adapt the source model to a target planning style: ``--config=transfer:STYLE --source=SOURCE_WORKDIR``.

STYLE is internal_a, internal_b, internal_c or external (default internal_a); ``source``
applies the same recipe to source-style plans: the study's control, which measures what the
extra training alone brings. The paper's recipe: start from the source model, freeze encoder
and bottleneck, re-initialize the head, learning rate 1e-5; other hyperparameters as the
source. Every training plan of the style trains (val_cases=0, as in the paper), so
prediction uses the final checkpoint.
"""

from flaxdose.configs import source
from flaxdose.errors import FlaxdoseError
from flaxdose.synthetic.styles import PAPER_SPLITS

TARGET_STYLES = ("internal_a", "internal_b", "internal_c", "external")
CONTROL_STYLE = "source"


def get_config(style: str = "internal_a"):
    if style not in (*TARGET_STYLES, CONTROL_STYLE):
        raise FlaxdoseError(f"unknown target style {style!r}; choose one of {TARGET_STYLES} (or {CONTROL_STYLE!r}: the control)")
    c = source.get_config()
    n_train, n_test = PAPER_SPLITS[style]
    c.data.update(style=style, n_train=n_train, n_test=n_test, val_cases=0)
    c.train.update(steps=4000, eval_every=500, checkpoint_every=500)
    c.transfer.update(mode="paper", source="", learning_rate=1e-5)
    return c
