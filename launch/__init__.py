"""Study drivers: the paper study, OpenKBP, sweeps, plan QA (``python -m flaxdose.launch.<study>``).

This folder installs as the package ``flaxdose.launch`` (pyproject.toml maps it), and that is its
one import name: under a second name (``launch``, from the repository root) a study imported by
another would load twice, with two copies of its state.
"""

import sys

if __name__ != "flaxdose.launch":  # one line and exit status 2, as every flaxdose command reports bad usage
    print("flaxdose: error: launch/ is the package flaxdose.launch: run python -m flaxdose.launch.<study> "
          "(e.g. python -m flaxdose.launch.paper_study) or its console script (flaxdose-study, ...)", file=sys.stderr)
    raise SystemExit(2)
