"""One clear line on stderr and a non-zero exit for a user's mistake, never a traceback (SPEC §10)."""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import torch

from distributed import local_device


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
    """argparse that reports a bad flag as a UserError (one line) instead of usage text plus a line."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def resolve_device(device: str) -> torch.device:
    """`auto` is cuda when present, else cpu; under torchrun, `cuda` is this rank's GPU (LOCAL_RANK)."""
    if device == "auto":
        return local_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise OptionError("device", f"unknown {{opt}} {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError("device", f"{{opt}} {device} asked for but no CUDA GPU is available; use {{opt}} cpu")
    return local_device(dev)


def check_positive(option: str, value: float | None) -> None:
    """None passes (an unset option)."""
    if value is not None and not value > 0:
        raise OptionError(option, f"{{opt}} must be positive, got {value}")


def check_at_least(option: str, value: float | None, minimum: float) -> None:
    if value is not None and not value >= minimum:
        raise OptionError(option, f"{{opt}} must be at least {minimum:g}, got {value}")
