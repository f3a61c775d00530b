"""The one entry-point mechanism of every flaxdose command (`python -m flaxdose.X` and `flaxdose-X`).

A command is a module with absl flags and a ``main(argv)``; `run(main)` runs it:
- ``--config=NAME`` (a name in configs/, ``NAME:ARG``, or a path) becomes the config file's
  path before absl parses the flags, and `ml_collections.config_flags` applies the
  ``--config.section.key=value`` overrides (`config_flag` defines that flag);
- ``-h`` is ``--help`` (absl knows only ``--help``, ``-help`` and ``-?``): usage printed, exit 0;
- orbax/grain INFO chatter is hidden unless ``--verbosity`` is given.

Exit status, the same for every command: 0 done; 1 done, but some items failed (the command
lists them, e.g. patients an import skipped); 2 bad input or usage, reported as one line
``flaxdose: error: <what was wrong and how to fix it>`` (a `FlaxdoseError` or a flag error);
3 done, and the check found something (`flaxdose.qa`: at least one plan flagged; every plan
checked), so scripts can tell "flagged" from "failed"; 130 interrupted by Ctrl-C (one line, no
traceback).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags
from tqdm import tqdm

from flaxdose import config as config_lib
from flaxdose.errors import FlaxdoseError

USAGE_ERROR = 2
PARTIAL_FAILURE = 1
FLAGGED = 3
INTERRUPTED = 130  # the shell's convention for a Ctrl-C (128 + SIGINT)


def config_flag(default: str, help_string: str = "config name in configs/ (NAME or NAME:ARG) or a path to a config .py "
                "file; --config.section.key=value overrides one value (e.g. --config.train.steps=2000)"):
    """Define ``--config`` (a `ml_collections.config_flags` config file flag) with a default config name.

    The flag is also a key flag of the command being run, so its ``--help`` lists it (absl lists only
    the main module's flags, and this one is defined here)."""
    holder = config_flags.DEFINE_config_file("config", config_lib.config_path(default), help_string)
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS["config"])
    return holder


def resolve_config_args(argv: Sequence[str]) -> list[str]:
    """argv with ``--config=NAME`` / ``--config NAME`` replaced by the config file's path.

    Raises FlaxdoseError for an unknown name (listing the available configs).
    """
    out, args = [], iter(argv)
    for arg in args:
        if arg.startswith("--config="):
            arg = "--config=" + config_lib.config_path(arg.removeprefix("--config="))
        elif arg == "--config":
            out.append(arg)
            arg = config_lib.config_path(next(args, ""))
        out.append(arg)
    return out


def help_alias(argv: Sequence[str]) -> list[str]:
    """argv with each ``-h`` (before a ``--`` separator) replaced by ``--help``; argv[0] is kept."""
    out, done = list(argv[:1]), False
    for arg in argv[1:]:
        done = done or arg == "--"
        out.append("--help" if arg == "-h" and not done else arg)
    return out


# What flag parsing raises for a bad value or an unknown --config.x.y (config_flags lets
# AttributeError and KeyError through absl's own error type).
_FLAG_ERRORS = (flags.Error, AttributeError, KeyError, TypeError, ValueError)


_HELP_FLAGS = {"--help", "-help", "-h", "-?", "--helpshort", "--helpfull", "--helpxml"}


def _parse_flags(argv: list[str]) -> list[str]:
    try:
        return flags.FLAGS(argv)
    except _FLAG_ERRORS as e:
        _fail(_flag_error(e, argv))


def _flag_error(error: BaseException, argv: Sequence[str]) -> str:
    """The one-line message for a flag or ``--config.*`` override that could not be parsed."""
    if isinstance(error, (KeyError, AttributeError)):  # config_flags' way of saying "no such setting"
        return _unknown_setting(error, argv)
    return f"{_describe(error)} (see --help)"


def _unknown_setting(error: BaseException, argv: Sequence[str]) -> str:
    """'unknown config setting ...' naming the ``--config.a.b`` flag(s) with the unknown key."""
    name, _, hint = _describe(error).partition(" ")
    name = name.strip("'\"") or "?"
    hint = hint[:1].lower() + hint[1:]  # "Did you mean ..." mid-sentence
    used = [a.split("=", 1)[0] for a in argv if a.startswith("--config.")]
    where = [a for a in used if name in a.removeprefix("--").split(".")] or used
    return (f"unknown config setting {name!r} in {', '.join(where) or 'the flags'}"
            f"{'; ' + hint if hint else ''}; the settings a config has are the keys of its file in configs/ "
            "(see --help)")


def _describe(error: BaseException) -> str:
    """One line of an exception's message (config_flags nests quoted messages with newlines)."""
    message = str(error)
    for _ in range(3):  # AttributeError(KeyError("'x'\\nDid you mean ...")) prints nested quotes
        if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":
            message = message[1:-1]
        message = message.replace("\\n", " ").replace("\\'", "'")
    return " ".join(message.split())


def _close_bars():
    for bar in list(getattr(tqdm, "_instances", ())):  # an open progress bar would swallow the line
        bar.close()


def _fail(message: str):
    _close_bars()
    print(f"flaxdose: error: {message}", file=sys.stderr)
    sys.exit(USAGE_ERROR)


def require(usage: str, **given) -> None:
    """Raise FlaxdoseError naming every missing required flag: ``given`` maps a flag's name to
    (its value, what it is for); a value that is empty or None is missing."""
    missing = [f"--{name} ({what})" for name, (value, what) in given.items() if value in (None, "", [], ())]
    if missing:
        raise FlaxdoseError(f"missing {', '.join(missing)}; {usage}")


def show_in_help(module: str) -> None:
    """Make a face's flags the ones `--help` lists when it runs as a console script (absl lists
    the flags of the program's main module, which is then the script wrapper, not the face)."""
    if module == "__main__":
        return
    for flag in flags.FLAGS.flags_by_module_dict().get(module, []):
        flags.FLAGS.register_key_flag_for_module(sys.argv[0], flag)


def run(main: Callable[[list[str]], int | None], define_flags: Callable[[], None] | None = None,
        argv: Sequence[str] | None = None) -> None:
    """Define the command's flags, parse them and run ``main(argv)`` with flaxdose's conventions.

    `define_flags` runs first (config_flags parses the default config, and its overrides,
    when ``--config`` is defined); `argv` defaults to sys.argv.
    """

    def quiet_main(argv):
        if not flags.FLAGS["verbosity"].present:
            absl_logging.set_verbosity(absl_logging.WARNING)
        logging.getLogger("flaxdose").setLevel(logging.INFO)
        return main(argv)

    try:
        sys.argv = resolve_config_args(help_alias(sys.argv if argv is None else argv))  # config_flags reads sys.argv
        if define_flags is not None:
            try:
                define_flags()
            except _FLAG_ERRORS as e:
                _fail(_flag_error(e, sys.argv))
            show_in_help(main.__module__)
        app.run(quiet_main, flags_parser=_parse_flags)
    except SystemExit as e:
        if e.code == 1 and set(sys.argv[1:]) & _HELP_FLAGS:  # absl exits 1 after printing the help asked for
            sys.exit(0)
        raise
    except FlaxdoseError as e:
        _fail(str(e))
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback from wherever the work was
        _close_bars()
        print("flaxdose: interrupted; nothing half-written is left (checkpoints, datasets and files are written "
              "whole or not at all), and re-running the same command resumes a training run from its last "
              "checkpoint", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not sys.exit: XLA's compiler and orbax's writer threads may still run, and tearing the
        # interpreter down under them can segfault (seen on a Ctrl-C during compilation).
        os._exit(INTERRUPTED)
    except OSError as e:  # a path that cannot be created, read or written: the user's to fix, not a crash
        where = f": {e.filename}" if e.filename else ""
        _fail(f"{e.strerror or e}{where}; check that the path exists, is a folder where one is expected, "
              "and is writable")
