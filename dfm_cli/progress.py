"""The one progress reporter of every long command (train, sample, eval, encode, ablate).

On a terminal it is a live rich bar: label, bar, count, an info field, time left. Anywhere
else (a log file, CI, nohup, a cluster's job output) a redrawn bar is unreadable, so it writes
plain lines instead, `LABEL DONE/TOTAL (PCT)  INFO  XmYYs left`: when the caller marks a log
point, when the work completes, and at least every `PLAIN_EVERY_S` seconds while it advances.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeRemainingColumn
from rich.progress import Progress as Bar

PLAIN_EVERY_S = 30.0  # without a terminal, a progress line at least this often


def progress_line(label: str, done: int, total: int, info: str, seconds_per_item: float | None) -> str:
    """The plain line for logs; the time left is omitted while no rate is known yet.

    >>> progress_line("train step", 50, 1500, "loss 0.5123  184 img/s", 0.35)
    'train step 50/1500 (3%)  loss 0.5123  184 img/s  8m27s left'
    >>> progress_line("sample", 6, 6, "", 0.1)
    'sample 6/6 (100%)  0m00s left'
    """
    share = f"{done / total:.0%}" if total else "100%"
    line = f"{label} {done}/{total} ({share})" + (f"  {info}" if info else "")
    if seconds_per_item is None:
        return line
    left = round(seconds_per_item * (total - done))
    return f"{line}  {left // 60}m{left % 60:02d}s left"


class Progress:
    """Progress of `total` items under `label`, as a context manager: a rich bar when `console`
    is a terminal, plain lines otherwise (see the module docstring).

    `completed` is where the work starts (a resumed run); the time left is estimated from the
    items done since then. `info` is a live field beside the count ("loss 0.41  184 img/s").
    A quiet console (a non-zero torchrun rank) shows nothing in either mode.
    """

    def __init__(
        self,
        console: Console,
        label: str,
        total: int,
        completed: int = 0,
        *,
        info: str = "",
        transient: bool = False,
        every: float = PLAIN_EVERY_S,
    ) -> None:
        self.console, self.label, self.total, self.every = console, label, total, every
        self.completed = self.start = completed
        self.info = info
        self.plain = not console.is_terminal
        self.began = self.last_line = time.perf_counter()
        self.ended = completed >= total  # the completing line is written once
        self.bar: Bar | None = None
        self.task = TaskID(0)
        if not self.plain:
            self.bar = Bar(
                TextColumn("{task.description}", markup=False),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                TimeRemainingColumn(),
                console=console,
                transient=transient,
            )
            self.task = self.bar.add_task(label, total=total, completed=completed, info=info)

    def __enter__(self) -> Progress:
        self.began = self.last_line = time.perf_counter()
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.bar is not None:
            self.bar.stop()

    def advance(self, n: int = 1, *, log: bool = False) -> None:
        """`n` more items done; `log` forces a plain line for this call."""
        self.update(completed=self.completed + n, log=log)

    def update(self, *, completed: int | None = None, info: str | None = None, log: bool = False) -> None:
        """Set the count and/or the info field. Without a terminal a line is written when `log`
        is set (a training log step), when the count first reaches the total, or when
        `every` seconds have passed since the last line."""
        if completed is not None:
            self.completed = completed
        if info is not None:
            self.info = info
        if self.bar is not None:
            self.bar.update(self.task, completed=self.completed, info=self.info)
            return
        now = time.perf_counter()
        ending = not self.ended and self.completed >= self.total
        if log or ending or now - self.last_line >= self.every:
            self.ended = self.ended or ending
            self.last_line = now
            self.write(self.line(now))

    def say(self, text: str) -> None:
        """What is being done now ("[2/4] cfg=1.5: train runs/0"): the info field on a terminal,
        one line `LABEL TEXT` in a log, where each step of slow work is worth a line."""
        if self.bar is not None:
            self.update(info=text)
        else:
            self.write(f"{self.label} {text}")

    def line(self, now: float | None = None) -> str:
        """The plain line for the current state (`progress_line`)."""
        done = self.completed - self.start
        elapsed = (now if now is not None else time.perf_counter()) - self.began
        return progress_line(self.label, self.completed, self.total, self.info, elapsed / done if done > 0 else None)

    def write(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False, soft_wrap=True)
        self.console.file.flush()
