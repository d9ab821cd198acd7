"""Progress output: a bar on a terminal, a bounded number of plain lines elsewhere."""

from __future__ import annotations

import io

import pytest

from flownp.progress import Progress, format_seconds


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with Progress(2000, desc="train", stream=out, every_seconds=1e9) as bar:
        assert bar.mode == "lines"
        for _ in range(2000):
            bar.update(1, bpd=3.14159, img_s=431.7)
    lines = out.getvalue().splitlines()
    assert len(lines) == 50  # every 40 steps, the last at 2000
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("train: step 40/2000 (2%)  bpd 3.1416  img/s 432  elapsed ")
    assert lines[-1].startswith("train: step 2000/2000 (100%)")
    assert "ETA" in lines[-1]


def test_time_based_lines_and_resumed_start():
    out = io.StringIO()
    bar = Progress(100, initial=60, desc="x", stream=out, lines=1, every_seconds=0.0)
    for _ in range(5):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert [ln.split()[2] for ln in lines] == ["61/100", "62/100", "63/100", "64/100", "65/100"]


def test_close_prints_the_last_state_once():
    out = io.StringIO()
    bar = Progress(1000, desc="t", stream=out, every_seconds=1e9)
    for _ in range(5):
        bar.update(1)
    bar.close()
    bar.close()
    assert out.getvalue().splitlines() == [out.getvalue().splitlines()[0]]
    assert "step 5/1000" in out.getvalue()


def test_disabled_prints_nothing_but_messages():
    out = io.StringIO()
    bar = Progress(10, stream=out, enabled=False)
    for _ in range(10):
        bar.update(1)
    bar.write("hello")
    bar.close()
    assert out.getvalue() == "hello\n"


def test_bar_on_a_terminal():
    out = _Tty()
    with Progress(10, desc="train", stream=out) as bar:
        assert bar.mode == "bar"
        for _ in range(10):
            bar.update(1, bpd=1.5)
    assert "\r" in out.getvalue() and "10/10" in out.getvalue()


def test_format_seconds_and_bad_mode():
    assert format_seconds(75.3) == "1:15"
    assert format_seconds(3725) == "1:02:05"
    assert format_seconds(float("nan")) == "?"
    with pytest.raises(ValueError, match="mode"):
        Progress(3, mode="fancy")


def test_eta_respects_a_time_budget(monkeypatch):
    import flownp.progress as P

    clock = iter([0.0, 10.0])  # start, then the line 10 s later
    monkeypatch.setattr(P.time, "perf_counter", lambda: next(clock))
    bar = Progress(100_000, desc="train", stream=io.StringIO(), seconds=60.0, lines=1)
    bar.n = 100  # 100 steps in 10 s: the steps would take 10,000 s more
    assert bar.line().endswith("ETA 0:50")  # the budget ends first
    clock = iter([0.0, 10.0])
    bar = Progress(200, desc="train", stream=io.StringIO(), seconds=60.0, lines=1)
    bar.n = 100
    assert bar.line().endswith("ETA 0:10")  # the steps end first
