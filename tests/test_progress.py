"""The one progress reporter: a rich bar on a terminal, plain lines in a log."""

from __future__ import annotations

import io
from typing import cast

import pytest
from rich.console import Console

from dfm_cli import progress as progress_module
from dfm_cli.progress import Progress


def console(terminal: bool, quiet: bool = False) -> Console:
    return Console(file=io.StringIO(), force_terminal=terminal, width=120, quiet=quiet)


def text(c: Console) -> str:
    return cast(io.StringIO, c.file).getvalue()


def lines(c: Console) -> list[str]:
    return text(c).splitlines()


class Clock:
    """A stand-in for `time.perf_counter`, moved by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", c)
    return c


def test_a_log_gets_the_training_line_at_log_points(clock):
    c = console(terminal=False)
    with Progress(c, "train step", 1500) as p:
        clock.now += 10
        p.update(completed=49)  # not a log point, and less than 30 s since the start: no line
        clock.now += 7.5
        p.update(completed=50, info="loss 0.5123  184 img/s", log=True)
    assert lines(c) == ["train step 50/1500 (3%)  loss 0.5123  184 img/s  8m27s left"]


def test_a_log_gets_a_line_every_30_seconds_and_one_at_the_end(clock):
    c = console(terminal=False)
    with Progress(c, "encode", 6) as p:
        for _ in range(6):
            clock.now += 12
            p.advance(1)
        p.advance(0)  # past the end: the completing line is not repeated
    assert lines(c) == [
        "encode 3/6 (50%)  0m36s left",  # 36 s after the start: 12 s an item
        "encode 6/6 (100%)  0m00s left",
    ]


def test_a_resumed_count_estimates_from_its_own_items(clock):
    c = console(terminal=False)
    with Progress(c, "train step", 100, completed=90) as p:
        clock.now += 5
        p.update(completed=95, log=True)
        assert p.line() == "train step 95/100 (95%)  0m05s left"
    assert lines(c) == ["train step 95/100 (95%)  0m05s left"]


def test_no_time_left_before_any_item_and_the_info_field_persists(clock):
    c = console(terminal=False)
    with Progress(c, "sample", 4, info="warming up") as p:
        p.update(log=True)
        clock.now += 2
        p.advance(2, log=True)
    assert lines(c) == ["sample 0/4 (0%)  warming up", "sample 2/4 (50%)  warming up  0m02s left"]


def test_say_is_one_plain_line_in_a_log():
    c = console(terminal=False)
    with Progress(c, "ablate", 4) as p:
        p.say("[1/4] cfg=1.5: train runs/0")
    assert lines(c) == ["ablate [1/4] cfg=1.5: train runs/0"]


def test_a_terminal_gets_the_bar_and_no_plain_line():
    c = console(terminal=True)
    with Progress(c, "sample", 6) as p:
        assert not p.plain
        p.advance(3, log=True)
        p.update(info="12.5 items/s")
        p.say("[2/6] a cell")
        p.advance(3)
    out = text(c)
    assert "6/6" in out and "[2/6] a cell" in out and "sample" in out
    assert "(50%)" not in out and "(100%)" not in out


def test_a_quiet_console_shows_nothing_in_either_mode():
    for terminal in (False, True):
        c = console(terminal, quiet=True)
        with Progress(c, "encode", 2) as p:
            p.advance(2, log=True)
            p.say("hello")
        assert text(c) == ""


def test_markup_in_a_label_or_info_is_printed_as_is():
    c = console(terminal=False)
    with Progress(c, "[bold]x", 1, info="[red]y") as p:
        p.advance(1)
    assert lines(c)[0].startswith("[bold]x 1/1 (100%)  [red]y")
