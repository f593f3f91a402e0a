"""Progress of long loops: a tqdm bar on a terminal; in a log (Slurm, nohup, a pipe), where a bar shows
nothing until its last refresh, a plain line at a steady pace."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 60.0
"""A log line at least this often while a loop runs."""
LOG_EVERY_FRACTION = 0.05
"""And each time this much more of a loop of known length is done."""
LOG_MIN_GAP_S = 10.0
"""But not more often than this (a loop whose total grows as work is found would print every few chunks)."""
LOG_PREFIX = "progress "
"""How every log line starts (to grep them, or leave them out)."""


class _Nowhere:
    """Where tqdm's own drawing goes (its carriage returns and blank lines would litter a log)."""

    def write(self, text: str) -> None:
        pass

    def flush(self) -> None:
        pass


class LogLines(tqdm):
    """tqdm without a terminal: `progress <desc>: n/total unit (p%), rate, elapsed, ETA, postfix` lines."""

    monitor_interval = 0
    """No tqdm monitor thread: lines are printed from the loop itself (and a thread left running at exit
    can abort a torchrun process)."""

    def __init__(self, *args, **kwargs):
        self._logged: tuple[float, int] | None = None
        """(time, n) of the last line; set by the first display (n = 0), which starts the clock."""
        super().__init__(*args, **{**kwargs, "file": _Nowhere(), "mininterval": 0, "miniters": 1, "disable": False})

    def display(self, msg=None, pos=None):
        done = self.total is not None and self.total > 0 and self.n >= self.total
        now = time.monotonic()
        if self._logged is None:
            self._logged = (now, 0)
            return
        last_t, last_n = self._logged
        step = LOG_EVERY_FRACTION * self.total if self.total else float("inf")
        due = now - last_t >= LOG_EVERY_S or (self.n - last_n >= step and now - last_t >= LOG_MIN_GAP_S)
        if self.n == last_n or not (done or due):
            return
        self._logged = (now, self.n)
        print(LOG_PREFIX + self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        d = self.format_dict
        rate = d["rate"] or (d["n"] / d["elapsed"] if d["elapsed"] else None)
        of = f"/{d['total']}" if d["total"] else ""
        pct = f" ({100 * d['n'] / d['total']:.0f}%)" if d["total"] else ""
        speed = f", {rate:.3g} {d['unit']}/s" if rate else ""
        eta = (f", ETA {self.format_interval((d['total'] - d['n']) / rate)}" if rate and d["total"] else "")
        post = f", {d['postfix']}" if d.get("postfix") else ""
        return (f"{d['prefix'] or 'working'}: {d['n']}{of} {d['unit']}{pct}{speed}, elapsed "
                f"{self.format_interval(d['elapsed'])}{eta}{post}")


def progress(iterable=None, *, disable: bool = False, **kwargs) -> tqdm:
    """tqdm(iterable, **kwargs) on a terminal, LogLines elsewhere; `disable`: neither (other ranks)."""
    if disable:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, **kwargs)
    return LogLines(iterable, **kwargs)
