"""Command-line flags declared once, as documented dataclass fields (in the manner of sparsify's
config.py): the field's name is the flag (`--top_k`), its default the flag's default, its docstring
the help. `Literal[...]` fields are checked by `check_choices` with one clear line, not argparse's."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin, get_type_hints

from errors import ArgumentParser, UserError, unwrap_optional

T = TypeVar("T")


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right under a field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__[:-1]):
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def add_options(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (), **help_extra: str) -> None:
    """One flag per field of dataclass `cls` (but `skip`). `help_extra[field]` is appended to the help."""
    hints, docs = get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp = unwrap_optional(hints[f.name])
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        default = None if required else (f.default if f.default is not dataclasses.MISSING else f.default_factory())
        help_ = " ".join(x for x in (docs.get(f.name, ""), help_extra.get(f.name, "")) if x).replace("%", "%%")
        # `0 in (None, False)` is true: a default of 0 must still be shown
        shown = "" if required or default is None or default is False else " (default: %(default)s)"
        kw: dict[str, Any] = {"help": help_ + shown}
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
        elif get_origin(tp) is list:
            kw.update(nargs="*" if isinstance(default, list) else "+", type=get_args(tp)[0])
        elif get_origin(tp) is Literal:
            kw.update(type=type(get_args(tp)[0]), metavar="{" + ",".join(map(str, get_args(tp))) + "}")
        else:
            kw["type"] = tp
        if required:
            kw["required"] = True
        else:
            kw["default"] = default
        parser.add_argument(f"--{f.name}", **kw)
        if kw.get("action") is argparse.BooleanOptionalAction:  # argparse spells the negative --no-x; ours use _
            parser.add_argument(f"--no_{f.name}", dest=f.name, action="store_false", help=argparse.SUPPRESS)


def parse(cls: type[T], argv: list[str] | None, description: str, **parser_kw: Any) -> T:
    """A command line whose flags are exactly the fields of dataclass `cls`, parsed into a `cls`."""
    p = ArgumentParser(description=description, **parser_kw)
    add_options(p, cls)
    return options_from(cls, p.parse_args(argv))


def options_from(cls: type, args: argparse.Namespace, **values: Any):
    """`cls` built from the parsed flags of its fields (`values` override or complete them)."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {n: getattr(args, n) for n in names if hasattr(args, n)}
    return cls(**{**kwargs, **values})


def check_output(path: str | None, flag: str) -> None:
    """Fail before the computation, not after it, when an output file cannot be written."""
    if path is None:
        return
    if Path(path).is_dir():
        raise UserError(f"{flag} {path}: is a folder; give the path of a file")
    if not Path(path).resolve().parent.is_dir():
        raise UserError(f"{flag} {path}: folder {str(Path(path).resolve().parent)!r} does not exist")


@dataclass
class OutputOptions:
    """Where a command writes its results besides the terminal (checked before any computation)."""
    json: str | None = None
    """Write the results to this JSON file."""
    plot: str | None = None
    """Write the command's figure to this PNG file."""

    def __post_init__(self):
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()
        check_output(self.json, "--json")
        check_output(self.plot, "--plot")

    def write(self, record, plot=None) -> None:
        """Save `record` to --json and call plot(path) for --plot, each when asked for."""
        if self.json:
            record.save(self.json)
        if self.plot and plot is not None:
            plot(self.plot)
