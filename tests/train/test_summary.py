"""pdl_jax/train/summary.py: the closing summary of a finished run."""

from __future__ import annotations

import json
import math

from pdl_jax.train import summary


def test_closing_summary_compares_step_0_with_the_last_eval(tmp_path):
  w = tmp_path / "run"
  (w / "checkpoints" / "60").mkdir(parents=True)
  (w / "checkpoints" / "60" / "state").write_bytes(b"x" * 3000)
  (w / "samples").mkdir()
  (w / "samples" / "final_greedy.jsonl").write_text("{}\n")
  records = [{"step": 0, "eval/nll": 4.694, "eval/rougeL": 6.325, "eval/loop": 0.25,
              "eval/top_p/rougeL": 5.5},
             {"step": 10, "train/loss": 5.0},
             {"step": 60, "eval/nll": 4.734, "eval/rougeL": 4.88, "eval/loop": math.nan,
              "eval/top_p/rougeL": 3.25, "eval/distinct_1": 0.4}]
  (w / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  text = summary.closing_summary(str(w), 60, 125.0)
  lines = text.splitlines()
  assert lines[0] == "run finished: step 60 (2.1 min in this process)"
  assert lines[1].split() == ["step", "0", "step", "60"]
  rows = {l[:30].strip(): l[30:].split() for l in lines[2:6]}
  assert rows == {"eval NLL (nats/token)": ["4.694", "4.734"], "ROUGE-L": ["6.33", "4.88"],
                  "outputs that loop": ["0.250", "-"], "top_p ROUGE-L": ["5.50", "3.25"]}
  size = 3000 + len("{}\n") + (w / "metrics.jsonl").stat().st_size
  assert f"workdir: {w} ({summary.size_text(size)}: checkpoints 2.9 KiB" in text
  assert f"python -m pdl_jax.cli.export_hf --workdir={w} --out={w}/export" in text
  assert f"tensorboard --logdir={w}/tensorboard" in text


def test_without_a_step_0_eval_one_column(tmp_path):
  (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 30, "eval/nll": 2.0}) + "\n")
  lines = summary.closing_summary(str(tmp_path), 30, 1.0).splitlines()
  assert lines[1].split() == ["step", "30"]
  assert lines[2].split()[-2:] == ["(nats/token)", "2.000"]


def test_size_text():
  assert [summary.size_text(n) for n in (512, 3 * 2**20 + 2**19, 1.4 * 2**30, 2**42)] == [
      "512 B", "3.5 MiB", "1.4 GiB", "4096.0 GiB"]
