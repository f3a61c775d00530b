"""Shared entry-point plumbing: absl app, quiet library logs, FlaxdoseError -> one clear line, exit 2."""

import logging
import sys

from absl import app, flags
from absl import logging as absl_logging

from flaxdose.errors import FlaxdoseError


def run(main, flags_parser=None) -> None:
    """`app.run(main)`, with orbax/grain INFO chatter hidden unless --verbosity is given."""

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("flaxdose").setLevel(logging.INFO)
        return main(argv)

    kwargs = {"flags_parser": flags_parser} if flags_parser else {}
    try:
        app.run(quiet_main, **kwargs)
    except FlaxdoseError as e:
        print(f"flaxdose: error: {e}", file=sys.stderr)
        sys.exit(2)
