"""pdl_jax/eval/progress.py: a line at most every few seconds, one at the end."""

from __future__ import annotations

from pdl_jax.eval import progress


def test_lines_at_most_every_interval_and_at_the_end():
  now = [0.0]
  lines = []
  p = progress.Progress("eval at step 0: greedy", 256, lines.append, every_s=30,
                        clock=lambda: now[0])
  for done, t in ((64, 10.0), (128, 31.0), (192, 50.0), (256, 52.0)):
    now[0] = t
    p(done)
  assert lines == ["eval at step 0: greedy 128/256 prompts (31 s, eta 31 s)",
                   "eval at step 0: greedy 256/256 prompts (52 s)"]


def test_duration():
  assert [progress.duration(s) for s in (5, 89, 90, 600, 5400)] == [
      "5 s", "89 s", "1.5 min", "10.0 min", "1.5 h"]
