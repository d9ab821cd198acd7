"""Progress of a long loop: a live bar on a terminal, a few plain lines everywhere else.

On a terminal a tqdm bar redraws in place. When the stream is not a terminal (a log file, CI, a
batch job) a bar would write thousands of carriage-return updates, so :class:`Progress` writes
one plain line instead every ``1/lines`` of the loop or every ``every_seconds``, whichever comes
first, and at the end::

    train: step 480/2400 (20%)  bpd 2.4995  img/s 340  elapsed 1:44  ETA 7:55

A default training run (2400 steps, about nine minutes on 2 cores) writes about 50 such lines.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

__all__ = ["Progress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``75.3`` -> ``"1:15"``, ``3725`` -> ``"1:02:05"``; ``"?"`` when not finite."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Progress over ``total`` steps, starting at ``initial``.

    Parameters
    ----------
    total : int
        Steps of the whole loop.
    initial : int
        Steps already done (a resumed run).
    desc : str
        Name printed in front of every line.
    enabled : bool
        False: nothing is shown (``--no-progress``); :meth:`write` still prints.
    stream : text stream
        Where it goes (default ``sys.stderr``).
    mode : ``"auto"``, ``"bar"`` or ``"lines"``
        ``"auto"``: a bar when ``stream.isatty()``, plain lines otherwise.
    lines : int
        Plain mode: a line at least every ``total / lines`` steps.
    every_seconds : float
        Plain mode: and at least every this many seconds.
    seconds : float or None
        A time budget of the loop (a training time limit): the plain line's ETA is the smaller
        of the steps' estimate and the budget left. None: no budget.
    """

    def __init__(
        self,
        total: int,
        initial: int = 0,
        *,
        desc: str = "progress",
        enabled: bool = True,
        stream: TextIO | None = None,
        mode: str = "auto",
        lines: int = 50,
        every_seconds: float = 60.0,
        unit: str = "step",
        seconds: float | None = None,
    ) -> None:
        if mode not in ("auto", "bar", "lines"):
            raise ValueError(f"Progress: mode must be 'auto', 'bar' or 'lines', got {mode!r}")
        self.total, self.n, self.desc = int(total), int(initial), desc
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if callable(isatty) and isatty() else "lines"
        self.mode = mode
        self.every_steps = max(1, math.ceil(self.total / max(1, lines)))
        self.every_seconds = float(every_seconds)
        self.unit = unit
        self.seconds = seconds
        self._t0 = self._t_last = time.perf_counter()
        self._n0 = self._n_last = self.n
        self._fields: dict[str, Any] = {}
        self._bar = None
        if enabled and mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total,
                initial=min(self.n, self.total),
                desc=desc,
                unit=unit,
                dynamic_ncols=True,
                file=self.stream,
            )

    def update(self, n: int = 1, **fields: Any) -> None:
        """Advance by ``n`` steps; ``fields`` (e.g. ``bpd=3.1``) are shown with the step."""
        self.n += n
        self._fields = fields
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.update(n)
            if fields:
                self._bar.set_postfix({k: _fmt(v) for k, v in fields.items()}, refresh=False)
            return
        now = time.perf_counter()
        due = (
            self.n - self._n_last >= self.every_steps
            or now - self._t_last >= self.every_seconds
            or self.n >= self.total
        )
        if due:
            self._print_line(now)

    def line(self) -> str:
        """The plain progress line for the current state."""
        now = time.perf_counter()
        elapsed = now - self._t0
        done = self.n - self._n0
        eta = (self.total - self.n) * elapsed / done if done > 0 else float("nan")
        if self.seconds is not None:
            eta = min(eta, max(0.0, self.seconds - elapsed))  # min(nan, x) is nan: no estimate
        pct = 100.0 * self.n / self.total if self.total else 100.0
        parts = [f"{self.desc}: {self.unit} {self.n}/{self.total} ({pct:.0f}%)"]
        parts += [f"{k.replace('_', '/')} {_fmt(v)}" for k, v in self._fields.items()]
        parts += [f"elapsed {format_seconds(elapsed)}", f"ETA {format_seconds(eta)}"]
        return "  ".join(parts)

    def _print_line(self, now: float) -> None:
        print(self.line(), file=self.stream, flush=True)
        self._t_last, self._n_last = now, self.n

    def write(self, msg: str) -> None:
        """Print a message without breaking the bar."""
        if self._bar is not None:
            from tqdm import tqdm

            tqdm.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        """End the bar; in plain mode print the last line if it was not printed yet."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.enabled and self.n != self._n_last:
            self._print_line(time.perf_counter())

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 100 else f"{v:.4f}"
    return str(v)
