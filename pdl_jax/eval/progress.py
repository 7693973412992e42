"""Progress lines of a long evaluation: prompts decoded of N, elapsed and ETA, at most
one line every `every_s` seconds (and one when a decoding ends), so a run is never
silent for minutes and the log stays short."""

from __future__ import annotations

import time
from typing import Callable

EVERY_S = 30.0  # seconds between progress lines of one decoding


def duration(seconds: float) -> str:
  """'42 s', '3.5 min' or '1.2 h'."""
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


class Progress:
  """Calls log with "<label> <done>/<total> <unit> (<elapsed>, eta <left>)" when a
  decoding has run `every_s` seconds since the last line, and once at the end."""

  def __init__(self, label: str, total: int, log: Callable[[str], None], *,
               unit: str = "prompts", every_s: float = EVERY_S,
               clock: Callable[[], float] = time.perf_counter):
    self.label, self.total, self.log, self.unit = label, total, log, unit
    self.every_s, self.clock = every_s, clock
    self.start = self.last = clock()

  def __call__(self, done: int) -> None:
    """Reports `done` of the total finished."""
    now = self.clock()
    if done < self.total and now - self.last < self.every_s:
      return
    self.last = now
    elapsed = now - self.start
    text = f"{self.label} {done}/{self.total} {self.unit} ({duration(elapsed)}"
    if done < self.total:
      text += f", eta {duration(elapsed / max(done, 1) * (self.total - done))}"
    self.log(text + ")")
