"""Output of the command lines: our progress lines and results by default, everything with
``--verbose``.

Every entry point (``python -m dataflow ...``, ``python -m dataflow.<module>``,
``python -m benchmarks.<name>``) calls :func:`setup` first, before Beam or TensorFlow is
imported: TensorFlow's C++ start-up lines obey ``TF_CPP_MIN_LOG_LEVEL`` only if it is set
before TensorFlow loads, and the google libraries Beam imports warn as they load. So this
module imports nothing but the standard library. The library never calls it: importing
``dataflow``, ``transforms``, ``ps`` or ``schemas`` changes no logging or warnings state.
"""
from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import warnings

VERBOSE_FLAG = "--verbose"
VERBOSE_HELP = ("show every library's log lines and warnings: Beam's, TensorFlow's, ... "
                "(default: only our own lines)")
#: Top-level packages whose log lines are ours (``__main__``: a module run with -m).
OUR_PACKAGES = ("dataflow", "transforms", "ps", "schemas", "benchmarks", "__main__")
# A warnings filter's module is a regex matched at the start of the warning's module name.
_NOT_OURS = r"(?!(%s)(\.|$))" % "|".join(OUR_PACKAGES)


def verbose_requested(argv: list[str] | None = None) -> bool:
    """Whether ``--verbose`` is among the command-line arguments.

    Args:
        argv: the arguments (None: ``sys.argv[1:]``).

    Returns:
        True if it is.
    """
    return VERBOSE_FLAG in (sys.argv[1:] if argv is None else argv)


def setup(argv: list[str] | None = None) -> bool:
    """Sets up logging and warnings for a command-line run.

    Quiet (the default): log lines of our packages from INFO up, other libraries' from
    WARNING up, no warnings attributed to other libraries' modules (warnings about a call in
    our code still show), TensorFlow's C++ log off (unless ``TF_CPP_MIN_LOG_LEVEL`` is set).
    Verbose: every library's INFO lines and warnings, with the logger's name.

    Args:
        argv: the command-line arguments (None: ``sys.argv[1:]``); ``--verbose`` among them
            makes the run verbose.

    Returns:
        Whether the run is verbose.
    """
    verbose = verbose_requested(argv)
    handler = logging.StreamHandler(sys.stderr)
    if verbose:
        handler.setFormatter(logging.Formatter(
            "%(asctime)s %(levelname)s %(name)s: %(message)s", _TIME))
    else:
        # 3, not 2: its E lines at start-up ("Unable to register cuFFT factory") are noise
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        warnings.filterwarnings("ignore", module=_NOT_OURS)
        handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        handlers=[handler], force=True)
    for name in OUR_PACKAGES:  # verbose: our debug lines too (e.g. a job's every counter)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    return verbose


def verbose_flags(argv: list[str] | None = None) -> list[str]:
    """The flags that pass this run's verbosity on to the command lines of child processes.

    Args:
        argv: this run's arguments (None: ``sys.argv[1:]``).

    Returns:
        ``["--verbose"]`` if this run is verbose, else ``[]``.

    >>> verbose_flags(["--out", "x", "--verbose"]), verbose_flags(["--out", "x"])
    (['--verbose'], [])
    """
    return [VERBOSE_FLAG] if verbose_requested(argv) else []


_TIME = "%H:%M:%S"


class _Formatter(logging.Formatter):
    """``HH:MM:SS message``; a level other than INFO is named."""

    def __init__(self):
        super().__init__("%(asctime)s %(message)s", _TIME)
        self._leveled = logging.Formatter("%(asctime)s %(levelname)s %(message)s", _TIME)

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno == logging.INFO:
            return super().format(record)
        return self._leveled.format(record)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help``: the description as written, and every option's default after its help
    (unless the help already says it).

    >>> parser = argparse.ArgumentParser(
    ...     prog="demo", formatter_class=lambda prog: HelpFormatter(prog, width=100))
    >>> _ = parser.add_argument("--batch_size", type=int, default=256, help="examples per batch")
    >>> _ = parser.add_argument("--out", help="where to write (default: ./out)")
    >>> print(parser.format_help().split("options:")[1].strip())
    -h, --help            show this help message and exit
      --batch_size BATCH_SIZE
                            examples per batch (default: 256)
      --out OUT             where to write (default: ./out)
    """

    def _format_action(self, action):
        if not action.help and self._default_shown(action):
            action = copy.copy(action)  # argparse formats no help line for an empty help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        text = (action.help or "").strip()
        if self._default_shown(action) and "%(default)" not in text \
                and "(default" not in text.lower() and "default:" not in text.lower():
            text = f"{text} (default: %(default)s)".strip()
        return text

    @staticmethod
    def _default_shown(action) -> bool:
        default = action.default
        return bool(action.option_strings) and action.help != argparse.SUPPRESS and not (
            default is None or default is False or default == "" or
            default == argparse.SUPPRESS)


def add_verbose(parser, subcommand: bool = False) -> None:
    """Adds ``--verbose`` to a parser (:func:`setup` reads it from ``sys.argv``; a parser
    accepts and documents it).

    Args:
        parser: an ``argparse.ArgumentParser``.
        subcommand: the parser is a subcommand's, where a default would hide the main
            parser's value.
    """
    parser.add_argument(VERBOSE_FLAG, action="store_true", help=VERBOSE_HELP,
                        **({"default": argparse.SUPPRESS} if subcommand else {}))


def argument_parser(**kwargs) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with :class:`HelpFormatter` and ``--verbose``.

    Args:
        **kwargs: ``argparse.ArgumentParser``'s arguments.

    Returns:
        The parser.
    """
    kwargs.setdefault("formatter_class", HelpFormatter)
    parser = argparse.ArgumentParser(**kwargs)
    add_verbose(parser)
    return parser
