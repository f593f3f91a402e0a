"""One clear line on stderr and a non-zero exit for a user's mistake, never a traceback (docs/design.md#bad-input)."""
from __future__ import annotations

import argparse
import errno
import functools
import os
import sys
import time
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


class UserError(Exception):
    """A mistake in the input (flags, runs, files, offline resources); its message is the whole answer."""


class OptionError(UserError):
    """A bad option value. The library names the option by its config field (`chunk_size`); a command
    line re-raises it with the flag's spelling (`--chunk_size`) through `as_flag`."""

    def __init__(self, option: str, template: str):
        """`template` names the option as `{opt}`."""
        self.option, self.template = option, template
        super().__init__(template.format(opt=option))

    def as_flag(self) -> UserError:
        return UserError(self.template.format(opt=f"--{self.option}"))


DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
"""Errors of the disk, not of the code: a full disk or quota, a read-only or forbidden folder."""


def cli(main):
    """Wrap a CLI entry point: UserError and Ctrl-C become one line on stderr and exit code 2 / 130."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except OptionError as e:
            _fail(f"error: {e.as_flag()}")
        except UserError as e:
            _fail(f"error: {e}")
        except OSError as e:
            if e.errno not in DISK_ERRORS:
                raise
            where = f" ({e.filename})" if e.filename else ""
            _fail(f"error: {e.strerror or e}{where}; files are written under a temporary name and renamed "
                  "when complete, so earlier results are intact")
        except KeyboardInterrupt:
            print("interrupted: nothing complete was overwritten", file=sys.stderr)
            sys.exit(130)

    return wrapper


RANK_GRACE_S = 3.0
"""Under torchrun, ranks other than 0 wait this long before reporting an error: when every rank meets the
same bad input, torchrun stops them as rank 0 exits, and the error is printed once."""


def _fail(line: str) -> None:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) > 0:
        time.sleep(RANK_GRACE_S)
    print(line, file=sys.stderr)
    sys.exit(2)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line) instead of usage text plus a line, and
    takes flags only as spelled: `--sourc` is a mistake, not `--source`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def check_positive(option: str, value: float | None) -> None:
    """None passes (an unset option)."""
    if value is not None and not value > 0:
        raise OptionError(option, f"{{opt}} must be positive, got {value}")


def check_at_least(option: str, value: float | None, minimum: float) -> None:
    if value is not None and not value >= minimum:
        raise OptionError(option, f"{{opt}} must be at least {minimum:g}, got {value}")


def unwrap_optional(tp: Any) -> Any:
    """`X | None` is X."""
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def check_choices(obj: Any) -> None:
    """Every Literal-typed field of a dataclass instance holds one of its values."""
    for name, tp in get_type_hints(type(obj)).items():
        tp = unwrap_optional(tp)
        value = getattr(obj, name, None)
        if get_origin(tp) is Literal and value is not None and value not in get_args(tp):
            raise OptionError(name, f"unknown {{opt}} {value!r}; choose from {', '.join(map(str, get_args(tp)))}")
