"""Shared settings of the transfer-learning configs (one file per target style imports this).

The paper's recipe: start from the source model (--source=WORKDIR), freeze encoder and
bottleneck, re-initialize the head, learning rate 1e-5. Every training plan of the target
style trains (val_cases=0, as in the paper), so prediction uses the final checkpoint.
"""

from configs import source

# (train, test) plans per style, the paper's Table 1.
PAPER_SPLITS = {"internal_a": (29, 5), "internal_b": (14, 2), "internal_c": (17, 3), "external": (20, 40)}


def target_config(style: str):
    c = source.get_config()
    n_train, n_test = PAPER_SPLITS[style]
    c.data.update(style=style, n_train=n_train, n_test=n_test, val_cases=0)
    c.train.update(steps=4000, eval_every=500, checkpoint_every=500)
    c.transfer.update(mode="paper", source="", learning_rate=1e-5)
    return c
