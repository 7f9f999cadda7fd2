"""The benchmarks, each run as `python -m benchmarks.NAME` (their figures: docs/benchmarks.md)."""

import sys

import tyro

from mtq_common.training.checkpoint import CheckpointError
from mtq_common.training.config import ConfigError


def cli(main, args_type, name: str, *also: type[Exception]) -> None:
    """A benchmark's command line: parse its flags and run `main`; bad input (a flag's value, a missing run or file,
    and the exception types in `also`) is one paragraph naming `benchmarks.name` and exit code 2, as for the phase
    scripts, not a traceback; Ctrl-C is one line and exit code 130."""
    args = tyro.cli(args_type)
    try:
        main(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, *also) as err:
        print(f"benchmarks.{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:  # Ctrl-C: one line, as for the phase scripts
        print(f"benchmarks.{name}: interrupted", file=sys.stderr)
        sys.exit(130)
