"""Files one command writes for another to read (docs/design.md#versioned-files): typed dataclasses saved as JSON with a
`"schema"` number and a `"kind"`, written atomically; readers migrate the versions they know and
refuse the rest with one line. Also the one place that writes any file by "temporary name, then
rename", so an interrupted command never leaves a half-written file under the final name."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import shutil
import socket
import types
import typing
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, TypeVar, get_args, get_origin, get_type_hints

import numpy as np

from errors import UserError

R = TypeVar("R", bound="Record")


# ---- atomic files ----------------------------------------------------------------------------------------
def tmp_name(path: Path) -> Path:
    """The hidden temporary sibling of `path` that this process writes before renaming: unique to the
    process, also across the hosts of a cluster sharing the folder."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` writes the file at a temporary name, then it is renamed to `path` in one step."""
    path = Path(path)
    tmp = tmp_name(path)
    try:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as e:  # safetensors' Rust errors carry the OS error only in their text
            code = re.search(r"\(os error (\d+)\)", str(e))
            if code is None:
                raise
            raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from e
        # some writers (safetensors) create their files 0600: collaborators sharing the folder could not
        # read them; every file gets what the process's umask gives
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def _held(final: Path) -> Iterator[None]:
    """An exclusive lock on `.<name>.lock` beside `final` while it is built, so that a second process
    building the same folder (a resubmitted job) is refused with one line instead of deleting the first's
    work. The OS drops a killed process's lock: it never stays stuck."""
    lock = final.with_name(f".{final.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held = os.stat(lock).st_ino == os.fstat(fd).st_ino  # not a lock file its last holder removed
        except (BlockingIOError, FileNotFoundError):
            held = False
        if not held:
            who = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise UserError(f"{str(final)!r} is being written by {who}: wait for it to finish, or choose "
                            "another name")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # while still held: a waiting process then sees a new inode
    finally:
        os.close(fd)


@contextmanager
def staged_dir(final: str | Path, may_replace: Callable[[Path], None]) -> Iterator[Path]:
    """Build a folder in a hidden sibling and swap it into place on success: an interrupted command
    leaves the previous folder intact and no half-built one. `may_replace(final)` runs just before the
    swap and raises if `final` may not be replaced (something else may have created it meanwhile)."""
    final = Path(final).resolve()
    final.parent.mkdir(parents=True, exist_ok=True)
    with _held(final):
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a killed process (we hold the name)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = tmp_name(final)
        tmp.mkdir()
        try:
            yield tmp
            may_replace(final)
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            if final.exists():
                os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


# ---- typed records ---------------------------------------------------------------------------------------
class Record:
    """Base of the dataclasses saved as versioned JSON. A subclass sets KIND and SCHEMA, and may
    override `migrate` to upgrade the dicts of older schemas it knows."""

    KIND: ClassVar[str]
    SCHEMA: ClassVar[int]
    DESCRIPTION: ClassVar[str] = ""
    """What a file of this kind is, for error messages ("a comp_sharedness.py --json output")."""

    @classmethod
    def migrate(cls, obj: dict, schema: int) -> dict:
        """Upgrade a dict of an older schema; older schemas are unknown unless a subclass says otherwise."""
        raise ValueError(f"schema {schema!r}, this version reads schema {cls.SCHEMA}")

    def to_dict(self) -> dict:
        return {"schema": self.SCHEMA, "kind": self.KIND, **to_jsonable(self)}

    @classmethod
    def from_dict(cls: type[R], obj: Any) -> R:
        """Raises ValueError (with the path of the bad key) on anything that is not a valid record."""
        if not isinstance(obj, dict):
            raise ValueError(f"a JSON object expected, got {type(obj).__name__}")
        if obj.get("kind", cls.KIND) != cls.KIND:
            raise ValueError(f"a {obj.get('kind')!r} file, not a {cls.KIND!r} file")
        schema = obj.get("schema")
        if schema != cls.SCHEMA:
            obj = cls.migrate(obj, schema)
        return from_jsonable(cls, {k: v for k, v in obj.items() if k not in ("schema", "kind")}, "")

    def save(self, path: str | Path) -> None:
        write_atomic(path, lambda tmp: tmp.write_text(json.dumps(self.to_dict(), indent=1)))

    @classmethod
    def load(cls: type[R], path: str | Path, what: str | None = None) -> R:
        """The record in `path`, or one UserError line naming the file (`what`: how the user named it)."""
        what = what or str(path)
        try:
            obj = json.loads(Path(path).read_text())
        except OSError as e:
            raise UserError(f"{what}: {e.strerror or e}") from None
        except ValueError as e:
            raise UserError(f"{what}: not JSON ({e})") from None
        try:
            return cls.from_dict(obj)
        except (ValueError, TypeError) as e:
            raise UserError(f"{what} is not {cls.DESCRIPTION or f'a {cls.KIND} file'} ({e})") from None


def to_jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # an unset optional field is left out
        return {f.name: to_jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)
                if not (f.default is None and getattr(x, f.name) is None)}
    if isinstance(x, dict):
        return {str(k): to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return to_jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None  # JSON has no NaN: "not computed"
    return x


def from_jsonable(tp: Any, x: Any, where: str) -> Any:
    """`x` (parsed JSON) checked and converted to type `tp`; ValueError names the bad key."""
    origin, args = get_origin(tp), get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if x is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return from_jsonable(inner[0], x, where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(x, dict):
            raise ValueError(f"{where or 'top level'}: an object expected")
        hints, kwargs = get_type_hints(tp), {}
        for f in dataclasses.fields(tp):
            if f.name in x:
                kwargs[f.name] = from_jsonable(hints[f.name], x[f.name], f"{where}.{f.name}".lstrip("."))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ValueError(f"missing key {f'{where}.{f.name}'.lstrip('.')!r}")
        return tp(**kwargs)
    if origin is typing.Literal:
        if x not in args:
            raise ValueError(f"{where}: one of {', '.join(map(repr, args))} expected, got {x!r}")
        return x
    if origin is list:
        if not isinstance(x, list):
            raise ValueError(f"{where}: a list expected")
        return [from_jsonable(args[0], v, f"{where}[{i}]") for i, v in enumerate(x)]
    if origin is dict:
        if not isinstance(x, dict):
            raise ValueError(f"{where}: an object expected")
        return {from_jsonable(args[0], k, where): from_jsonable(args[1], v, f"{where}.{k}") for k, v in x.items()}
    if tp is np.ndarray:
        return np.array(x, dtype=np.float64)  # JSON null (NaN when written) -> NaN
    if tp is typing.Any:
        return x
    if tp is float and isinstance(x, (int, float)) and not isinstance(x, bool):
        return float(x)
    if tp is float and x is None:
        return float("nan")
    if tp is int and isinstance(x, str) and x.lstrip("-").isdigit():
        return int(x)  # JSON object keys
    if not isinstance(x, tp) or (tp is int and isinstance(x, bool)):
        raise ValueError(f"{where}: {tp.__name__} expected, got {x!r}")
    return x
