"""One clear line on stderr and a non-zero exit for a user's mistake, never a traceback (SPEC §10)."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in the input (flags, runs, files, offline resources); its message is the whole answer."""


def cli(main):
    """Wrap a CLI entry point: UserError and Ctrl-C become one line on stderr and exit code 2 / 130."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: nothing complete was overwritten", file=sys.stderr)
            sys.exit(130)

    return wrapper
