"""Progress of a long job: the line a log gets (total, rate, ETA), its cadence, lines while nothing
finishes, the bar on a terminal, and the ``PROGRESS_EVERY`` knob."""

from __future__ import annotations

import io
import logging
import time

import pytest

from webshards import progress as progress_module
from webshards.progress import Progress, duration, progress_every


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return caplog.messages


def test_line_has_total_rate_elapsed_and_eta() -> None:
    progress = Progress("build", total=10, unit="shards", samples_unit="samples", stream=io.StringIO())
    progress.update(3, samples=3000)
    # 3,000 samples in 66.4 s: 45.2/s; 3 shards took 66.4 s, the 7 left take 155 s more
    expected = "build: 3/10 shards (30%), 3,000 samples, 45.2 samples/s, elapsed 1m06s, ETA 2m35s"
    assert progress.line(66.4) == expected
    assert progress.line(66.4, final=True).endswith("elapsed 1m06s, finished")
    fresh = Progress("embed", 3, "tasks", "samples", stream=io.StringIO())
    assert fresh.line(1.0) == "embed: 0/3 tasks (0%), 0 samples, 0.0 samples/s, elapsed 1s, ETA unknown"
    images = Progress("caption", 100, "img", stream=io.StringIO())
    images.update(30)
    assert images.line(15.0) == "caption: 30/100 img (30%), 2.0 img/s, elapsed 15s, ETA 35s"
    unknown = Progress("captions", None, "img", stream=io.StringIO())
    unknown.update(30)
    assert unknown.line(15.0) == "captions: 30 img, 2.0 img/s, elapsed 15s"


def test_duration() -> None:
    assert [duration(s) for s in (0.4, 12, 187, 3720)] == ["0s", "12s", "3m07s", "1h02m"]


def test_lines_in_a_log_every_interval_and_a_last_one(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY", 3600.0)
    caplog.set_level(logging.INFO, logger="webshards")
    with Progress("build", 4, "shards", "samples", stream=io.StringIO()) as progress:
        progress.update(1, samples=10)
        assert lines(caplog) == []  # not due yet
        progress.start -= 3600.0  # an hour later
        progress.last -= 3600.0
        progress.update(1, samples=10)
    assert lines(caplog) == [
        "build: 2/4 shards (50%), 20 samples, 0.0 samples/s, elapsed 1h00m, ETA 1h00m",
        "build: 2/4 shards (50%), 20 samples, 0.0 samples/s, elapsed 1h00m, finished",
    ]


def test_lines_keep_coming_while_nothing_finishes(caplog, monkeypatch) -> None:
    """A long first unit: ``ticking()``'s thread logs lines with the total and an unknown ETA."""
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY", 0.02)
    monkeypatch.setattr(progress_module, "TICK_SECONDS", 0.01)
    caplog.set_level(logging.INFO, logger="webshards")
    with Progress("embed", 2, "shards", "samples", stream=io.StringIO()) as progress, progress.ticking():
        time.sleep(0.2)
    assert len(lines(caplog)) >= 2
    assert all(line.startswith("embed: 0/2 shards (0%), 0 samples") for line in lines(caplog))
    assert lines(caplog)[0].endswith("ETA unknown")


def test_a_job_cut_short_or_empty_has_no_last_line(caplog) -> None:
    with caplog.at_level(logging.INFO, logger="webshards"):
        with pytest.raises(KeyError), Progress("stats", 3, "shards", stream=io.StringIO()) as progress:
            progress.update(1)
            raise KeyError("x")
        with Progress("build", 0, "shards", stream=FakeTerminal()) as progress:
            progress.tick()
    assert lines(caplog) == []


def test_a_brief_job_has_a_last_line_only_after_lines(caplog, monkeypatch) -> None:
    """``brief`` (an eval, whose result line follows): a quick job adds no line, a long one ends its lines."""
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY", 3600.0)
    caplog.set_level(logging.INFO, logger="webshards")
    with Progress("eval zs", 2, "shards", "samples", stream=io.StringIO(), brief=True) as progress:
        progress.update(2, samples=20)
    assert lines(caplog) == []
    with Progress("eval zs", 2, "shards", "samples", stream=io.StringIO(), brief=True) as progress:
        progress.start -= 3600.0  # an hour later
        progress.last -= 3600.0
        progress.update(1, samples=10)
        progress.update(1, samples=10)
    assert lines(caplog) == [
        "eval zs: 1/2 shards (50%), 10 samples, 0.0 samples/s, elapsed 1h00m, ETA 1h00m",
        "eval zs: 2/2 shards (100%), 20 samples, 0.0 samples/s, elapsed 1h00m, finished",
    ]


def test_a_bar_on_a_terminal_and_no_lines(caplog, monkeypatch) -> None:
    monkeypatch.setattr(progress_module, "PROGRESS_EVERY", 0.0)
    terminal = FakeTerminal()
    caplog.set_level(logging.INFO, logger="webshards")
    with Progress("build", 10, "shards", "samples", stream=terminal) as progress:
        progress.update(3, samples=3000)
        progress.tick()
    drawn = terminal.getvalue()
    assert "build:" in drawn and "3/10" in drawn and "shards/s" in drawn and "3,000 samples" in drawn
    assert lines(caplog) == []
    plain = Progress("build", 10, "shards", stream=FakeTerminal(), bar=False)  # Ray's driver: lines only
    assert plain._bar is None


@pytest.mark.parametrize(("value", "seconds"), [(None, 30.0), ("300", 300.0), ("0", 0.0)])
def test_progress_every_from_the_environment(monkeypatch, value: str | None, seconds: float) -> None:
    if value is None:
        monkeypatch.delenv("PROGRESS_EVERY", raising=False)
    else:
        monkeypatch.setenv("PROGRESS_EVERY", value)
    assert progress_every() == seconds


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_a_bad_progress_every_names_the_variable(monkeypatch, value: str) -> None:
    monkeypatch.setenv("PROGRESS_EVERY", value)
    with pytest.raises(ValueError, match=f"^PROGRESS_EVERY must be a number of seconds >= 0, got '{value}'"):
        Progress("build", 1)
