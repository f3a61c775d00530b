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


CONFIG_OVERRIDES: list[str] = []  # the ``--config.x.y=v`` arguments of this command line


def split_config_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv for absl, ``--config.x.y=v`` overrides): overrides may also be written ``--config.x.y v``."""
    rest, overrides, args = [argv[0]], [], iter(argv[1:])
    for arg in args:
        if arg.startswith("--config."):
            overrides.append(arg if "=" in arg else f"{arg}={next(args, '')}")
        else:
            rest.append(arg)
    return rest, overrides


def parse_flags_with_overrides(argv: list[str]) -> list[str]:
    """absl flag parsing for CLIs with ``--config``: the overrides go to CONFIG_OVERRIDES."""
    rest, overrides = split_config_overrides(argv)
    CONFIG_OVERRIDES.extend(overrides)
    return flags.FLAGS(rest)
