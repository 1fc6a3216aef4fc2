"""Progress of a long job, the same for every command: a bar on a terminal, periodic lines in a log.

A job counts units of work towards a known total (tasks, shards, images) and, optionally, the samples they
held, which arrive unevenly (a shard's samples are known when it is done). When stderr is a terminal a tqdm
bar shows the total, rate and ETA; otherwise (a log file, a pipe, a cluster's driver log) a plain line goes
through ``logging`` every ``PROGRESS_EVERY`` seconds, e.g.
``build: 3/10 shards (30%), 3,000 samples, 45.2 samples/s, elapsed 1m05s, ETA 2m10s``, and one last line when
the job ends. A job whose first unit takes minutes still shows lines: the consumer calls ``tick`` while it
waits, or runs its work inside ``ticking()``, which ticks from a thread.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

PROGRESS_EVERY = 30.0
"""Seconds between progress lines in a log (not on a terminal), unless the ``PROGRESS_EVERY`` environment
variable says otherwise (e.g. ``PROGRESS_EVERY=300`` on a cluster, ``0``: a line at every unit)."""
TICK_SECONDS = 1.0
"""How often ``ticking()``'s thread (and a consumer waiting on workers) checks whether a line is due."""


def progress_every() -> float:
    """Seconds between progress lines: the ``PROGRESS_EVERY`` environment variable, else the constant."""
    text = os.environ.get("PROGRESS_EVERY")
    if text is None:
        return PROGRESS_EVERY
    try:
        seconds = float(text)
    except ValueError:
        seconds = float("nan")
    if not seconds >= 0:
        raise ValueError(f"PROGRESS_EVERY must be a number of seconds >= 0, got {text!r}")
    return seconds


def duration(seconds: float) -> str:
    """1h02m, 3m07s or 12s: a time a person reads at a glance."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Units done of ``total`` (None: unknown), and optionally the samples they held.

    ``bar``: None draws a bar when ``stream`` (stderr by default) is a terminal, False never (Ray's driver:
        lines only). Lines go to ``logger`` at INFO (the ``webshards`` logger by default), one every ``every``
    seconds (``progress_every()``); ``tick_every``: how often a waiting consumer ticks. Thread-safe, so
    ``ticking()``'s thread and the job may call it together. A job of no units shows nothing. ``brief``: a job
    that ends before its first line logs no last line either (an eval, whose result line follows at once:
    a quick one adds nothing to the log, a long one ends its lines with the last).
    """

    def __init__(
        self,
        desc: str,
        total: int | None,
        unit: str = "tasks",
        samples_unit: str | None = None,
        *,
        logger: logging.Logger | None = None,
        bar: bool | None = None,
        stream: TextIO | None = None,
        brief: bool = False,
    ) -> None:
        self.desc, self.total, self.unit, self.samples_unit = desc or unit, total, unit, samples_unit
        self.done = self.samples = self.lines = 0
        self.brief = brief
        self.every, self.tick_every = progress_every(), TICK_SECONDS
        self.start = self.last = time.monotonic()
        self._log = logger or logging.getLogger("webshards")
        self._lock = threading.Lock()
        self._closed = total == 0
        stream = stream or sys.stderr
        draw = bar if bar is not None else _is_terminal(stream)
        self._bar = _start_bar(self, stream) if draw and not self._closed else None

    def update(self, n: int = 1, samples: int = 0) -> None:
        """``n`` more units done, which held ``samples`` samples."""
        with self._lock:
            self.done += n
            self.samples += samples
            if self._bar is not None:
                self._bar.update(n)
                if self.samples_unit:
                    self._bar.set_postfix_str(self._samples_text(time.monotonic()), refresh=False)
        self.tick()

    def tick(self) -> None:
        """Log the line when ``every`` seconds have passed since the last (on a terminal: redraw the bar)."""
        with self._lock:
            now = time.monotonic()
            if self._closed:
                return
            if self._bar is not None:
                self._bar.refresh()
            elif now - self.last >= self.every:
                self.last = now
                self.lines += 1
                self._log.info("%s", self.line(now - self.start))

    def close(self, finished: bool = True) -> None:
        """End the bar, or log the last line (when anything was done and the job was not cut short)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            elif finished and (self.done or self.samples) and (self.lines or not self.brief):
                self._log.info("%s", self.line(time.monotonic() - self.start, final=True))

    def line(self, elapsed: float, final: bool = False) -> str:
        """E.g. ``build: 3/10 shards (30%), 3,000 samples, 45.2 samples/s, elapsed 1m05s, ETA 2m10s``."""
        parts = [f"{self.done:,} {self.unit}"]
        if self.total is not None:
            share = self.done / self.total if self.total else 1.0
            parts = [f"{self.done:,}/{self.total:,} {self.unit} ({share:.0%})"]
        if self.samples_unit:
            parts.append(f"{self.samples:,} {self.samples_unit}")
        count, unit = (self.samples, self.samples_unit) if self.samples_unit else (self.done, self.unit)
        parts.append(f"{count / elapsed if elapsed > 0 else 0.0:,.1f} {unit}/s")
        parts.append(f"elapsed {duration(elapsed)}")
        if final:
            parts.append("finished")
        elif self.total is not None:
            left = elapsed / self.done * (self.total - self.done) if self.done else None
            parts.append(f"ETA {duration(left) if left is not None else 'unknown'}")
        return f"{self.desc}: " + ", ".join(parts)

    def _samples_text(self, now: float) -> str:
        elapsed = now - self.start
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        return f"{self.samples:,} {self.samples_unit}, {rate:,.1f} {self.samples_unit}/s"

    @contextlib.contextmanager
    def ticking(self) -> Iterator[Progress]:
        """Tick from a background thread while the body runs (the job itself busy in one long unit).

        Not around a process pool's start: the pool's workers fork, and a fork while this thread writes a
        line could leave them a held lock; a consumer waiting on a pool calls ``tick`` itself instead.
        """
        stop = threading.Event()

        def loop() -> None:
            while not stop.wait(self.tick_every):
                self.tick()

        thread = threading.Thread(target=loop, name=f"progress {self.desc}", daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, error_type: type | None, *rest: Any) -> None:
        self.close(finished=error_type is None)  # an error says itself why the job ended


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def _start_bar(progress: Progress, stream: TextIO) -> Any:
    """A tqdm bar with the total, rate and ETA (tqdm is imported only here: ~80 ms, for a terminal only)."""
    from tqdm import tqdm

    return tqdm(
        total=progress.total, desc=progress.desc, unit=f" {progress.unit}", file=stream, dynamic_ncols=True
    )
