"""One clear line on stderr and a non-zero exit for a user's mistake, never a traceback (SPEC §10)."""
from __future__ import annotations

import argparse
import functools
import sys

import torch


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


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a bad flag as a UserError (one line) instead of usage text plus a line."""

    def error(self, message):
        raise UserError(f"{self.prog}: {message} (see --help)")


def resolve_device(device: str) -> torch.device:
    """--device: auto is cuda when present, else cpu."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown --device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} asked for but no CUDA GPU is available; use --device cpu")
    return dev
