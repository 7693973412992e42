"""experiments/report.py on a few tiny fake run folders."""

import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from experiments import measures
from experiments import report

# Configured points of the real-model comparison whose runs are not committed yet
# (the control issue's runs, in progress): a name per point, "ce-control" for the CE
# reruns with the logit-adjusted decodes. Each is removed as its runs land.
PENDING = {
    "summarization": set(),
    "dialogue": set(),
    "style_transfer": set(),
}

# The tests/ folder (this file is 1 level below it): shared fixtures live there.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ROOT = os.path.dirname(TESTS)


def fake_run(root, name, loss, alpha, seed, nll, rouge1, num_steps=20, eos_weight=None):
  d = root / name
  d.mkdir(parents=True)
  (d / "config.json").write_text(json.dumps({
      "loss": {"name": loss, "alpha": alpha, "eos_weight": eos_weight},
      "seed": seed, "num_steps": num_steps}))
  buckets = {f"eval/freq_bucket_{k}": (1.0 if k == 0 else 0.0) for k in range(10)}
  refs = {f"eval/ref_freq_bucket_{k}": 0.1 for k in range(10)}
  lines = [{"step": 5, "train/loss": 3.0},
           {"step": 10, "eval/nll": nll + 1, "eval/rouge1": 0.0, **buckets, **refs},
           {"step": 20, "eval/nll": nll, "eval/rouge1": rouge1, "eval/ref_length": 7.0,
            "eval/length": 5.0, **buckets, **refs}]
  (d / "metrics.jsonl").write_text("\n".join(json.dumps(l) for l in lines) + "\n")


def test_report_tables_and_plots(tmp_path):
  fake_run(tmp_path, "ce-seed0", "ce", 0.5, 0, 4.0, 10.0)
  fake_run(tmp_path, "a0.5-seed0", "pdl", 0.5, 0, 4.2, 12.0)
  fake_run(tmp_path, "a0.5-seed1", "pdl", 0.5, 1, 4.4, 14.0)
  fake_run(tmp_path, "nested/a1-seed0", "pdl", 1.0, 0, 4.8, 9.0)
  (tmp_path / "unfinished").mkdir()
  (tmp_path / "unfinished" / "config.json").write_text(json.dumps({"loss": {"name": "pdl", "alpha": 2.0}}))
  (tmp_path / "unfinished" / "metrics.jsonl").write_text(json.dumps({"step": 1, "train/loss": 1}) + "\n")
  # Killed before its final eval: its last eval (step 20) is a mid-run one.
  fake_run(tmp_path, "killed-seed0", "pdl", 3.0, 0, 9.0, 1.0, num_steps=40)
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                        str(tmp_path)], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert "left out 2 runs" in out.stderr and "killed-seed0" in out.stderr
  rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
  assert [r["point"] for r in rows] == ["ce", "alpha=0.5", "alpha=1"]
  assert [r["seeds"] for r in rows] == ["1", "2", "1"]
  half = rows[1]
  assert float(half["eval/nll_mean"]) == pytest.approx(4.3)  # final eval line, not step 10
  assert float(half["eval/nll_std"]) == pytest.approx(0.1414214, rel=1e-5)
  assert float(half["eval/rouge1_mean"]) == pytest.approx(13.0)
  md = open(tmp_path / "summary.md").read()
  assert "| alpha=0.5 | 2 | 4.300 ± 0.141 | 13.000 ± 1.414 | 5.000 ± 0.000 |" in md
  assert "References: length 7.000." in md
  # All generated mass in decile 0, references uniform: TV = (0.9 + 9 x 0.1) / 2.
  assert float(half["eval/profile_tv_mean"]) == pytest.approx(0.9)
  assert "| alpha=0.5 | 2 | 4.300 ± 0.141 | 13.000 ± 1.414 | 5.000 ± 0.000 | 0.900 ± 0.000 |" in md
  assert "top_p" not in md  # no sampled decoding logged: no table for it
  for png in ("metrics_vs_alpha.png", "frequency_profile.png"):
    assert os.path.getsize(tmp_path / png) > 1000
  strict = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                           str(tmp_path), "--strict"], capture_output=True, text=True, timeout=120)
  assert strict.returncode != 0 and "killed-seed0" in strict.stderr


def test_profile_tv_and_the_sampled_table(tmp_path):
  rng = np.random.default_rng(0)
  gen, ref, sampled = (rng.dirichlet(np.ones(10)) for _ in range(3))
  row = {**{f"eval/freq_bucket_{k}": gen[k] for k in range(10)},
         **{f"eval/ref_freq_bucket_{k}": ref[k] for k in range(10)},
         **{f"eval/top_p/freq_bucket_{k}": sampled[k] for k in range(10)}}
  assert report.profile_tv(row) == pytest.approx(0.5 * np.abs(gen - ref).sum())
  assert report.profile_tv(row, "eval/top_p/") == pytest.approx(0.5 * np.abs(sampled - ref).sum())
  assert report.profile_tv({"eval/nll": 1.0}) is None
  # A sampled decoding of the first eval.sampled_examples prompts: its own references.
  own = rng.dirichlet(np.ones(10))
  subset = {**row, **{f"eval/top_p/ref_freq_bucket_{k}": own[k] for k in range(10)}}
  assert report.profile_tv(subset, "eval/top_p/") == pytest.approx(
      0.5 * np.abs(sampled - own).sum())
  assert report.profile_tv(subset) == report.profile_tv(row)
  empty = {**row, **{f"eval/freq_bucket_{k}": 0.0 for k in range(10)}}  # nothing generated
  assert report.profile_tv(empty) is None
  fake_run(tmp_path, "ce-seed0", "ce", 0.5, 0, 4.0, 10.0)
  metrics = tmp_path / "ce-seed0" / "metrics.jsonl"
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  lines[-1].update({"eval/top_p/rouge1": 3.5, "eval/top_p/length": 9.0,
                    **{f"eval/top_p/freq_bucket_{k}": 0.1 for k in range(10)}})
  metrics.write_text("".join(json.dumps(l) + "\n" for l in lines))
  report.write_tables(report.collect(str(tmp_path)), str(tmp_path))
  md = (tmp_path / "summary.md").read_text()
  greedy, _, top_p = md.partition("Decoded with top_p:")
  assert "| ce | 1 | 4.000 | 10.000 | 5.000 | 0.900 |" in greedy
  assert "| point | seeds | rouge1 | length | profile_tv |" in top_p
  assert "| ce | 1 | 3.500 | 9.000 | 0.000 |" in top_p  # uniform = the references


def test_report_refuses_an_empty_root(tmp_path):
  with pytest.raises(SystemExit, match="no finished runs"):
    report.collect(str(tmp_path))


def test_sweep_expands_the_config_sweep_and_skips_finished(tmp_path):
  from experiments import sweep
  todo = sweep.commands("configs/dialogue.py:smoke", str(tmp_path), "pre", ["--x=1"])
  names = [os.path.basename(w) for w, _ in todo]
  assert names == [f"{point}-seed{seed}" for seed in (0, 1)
                   for point in ("ce", "alpha0.25", "alpha0.5", "alpha1",
                                 "alpha0.5-eos1", "itf", "face", "tlat_exp", "tlat_chi2",
                                 "unlikelihood", "focal", "label_smoothing")]
  assert todo[4][1][3].endswith("loss=pdl,alpha=0.5,eos_weight=1,seed=0")
  assert todo[5][1][3].endswith("loss=itf,seed=0")
  assert todo[1][1][3] == "--config=configs/dialogue.py:smoke,init_from=pre,loss=pdl,alpha=0.25,seed=0"
  assert todo[1][1][-1] == "--x=1"
  out = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                        "--config=configs/dialogue.py", f"--root={tmp_path}", "--print"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  # The real-model comparison: CE, PDL 0.25, 0.5 and 1, PDL 0.5 with EOS weight 1, the
  # ten baselines, two seeds; only the CE points evaluate the base model at step 0, and
  # they decode with the logit-adjusted control decodes too.
  lines = out.stdout.strip().splitlines()
  assert out.returncode == 0 and len(lines) == 30, out.stderr
  assert [("at_start=False" in l, "loss=ce," in l) for l in lines].count((False, True)) == 2
  assert all(("at_start=False" in l) != ("loss=ce," in l) for l in lines)
  assert all(("greedy_bias0.25" in l) == ("loss=ce," in l) for l in lines)
  # --only picks points by name (all seeds); unknown names list the sweep's points.
  only = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                         "--config=configs/dialogue.py", f"--root={tmp_path}", "--print",
                         "--only=ce,alpha=0.25"], cwd=ROOT, capture_output=True, text=True,
                        timeout=120)
  assert [l.split("--workdir=")[1].split()[0].rsplit("/", 1)[1]
          for l in only.stdout.splitlines()] == ["ce-seed0", "alpha0.25-seed0", "ce-seed1",
                                                 "alpha0.25-seed1"], only.stderr
  for flag, message in (("--only=ce,alpah0.25", "unknown point(s) ['alpah0.25']"),
                        ("--config.sweep.alphas=(0.5,)", "would be passed to every point")):
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "sweep.py"),
                          "--config=configs/dialogue.py", f"--root={tmp_path}", "--print",
                          flag], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and message in bad.stderr and not bad.stdout, bad.stderr
  # Finished = the final eval is logged; a checkpoint at num_steps alone is not enough
  # (a run killed after it, before its final eval).
  fake_run(tmp_path, "ce-seed0", "ce", 0.5, 0, 4.0, 10.0, num_steps=20)
  fake_run(tmp_path, "alpha0-seed0", "pdl", 0.0, 0, 4.0, 10.0, num_steps=40)
  (tmp_path / "alpha0-seed0" / "checkpoints" / "40").mkdir(parents=True)
  assert sweep.is_finished(str(tmp_path / "ce-seed0"), 20)
  assert not sweep.is_finished(str(tmp_path / "alpha0-seed0"), 40)
  assert not sweep.is_finished(str(tmp_path / "alpha0.5-seed0"), 40)


def test_report_copies_runs_and_regenerates_from_the_copies(tmp_path):
  root, out = tmp_path / "sweep", tmp_path / "results"
  fake_run(root, "ce-seed0", "ce", 0.5, 0, 4.0, 10.0)
  fake_run(root, "alpha1-seed0", "pdl", 1.0, 0, 4.8, 9.0)
  samples = root / "alpha1-seed0" / "samples"
  samples.mkdir()
  (samples / "step_0000010.jsonl").write_text('{"generation": "early"}\n')
  (samples / "step_0000200.jsonl").write_text('{"generation": "last"}\n')
  (root / "alpha1-seed0" / "checkpoints").mkdir()  # Not copied.
  cmd = [sys.executable, os.path.join(ROOT, "experiments", "report.py")]
  done = subprocess.run(cmd + [str(root), f"--out={out}", "--copy_runs"],
                        capture_output=True, text=True, timeout=120)
  assert done.returncode == 0, done.stderr
  copied = out / "runs" / "alpha1-seed0"
  assert sorted(os.listdir(copied)) == ["config.json", "metrics.jsonl", "samples"]
  assert os.listdir(copied / "samples") == ["step_0000200.jsonl"]
  assert (copied / "metrics.jsonl").read_text() == (root / "alpha1-seed0" / "metrics.jsonl").read_text()
  table = (out / "summary.csv").read_text()
  again = subprocess.run(cmd + [str(out / "runs"), f"--out={tmp_path / 'again'}"],
                         capture_output=True, text=True, timeout=120)
  assert again.returncode == 0, again.stderr
  assert (tmp_path / "again" / "summary.csv").read_text() == table


def test_report_refuses_to_copy_runs_into_its_own_root(tmp_path):
  fake_run(tmp_path, "ce-seed0", "ce", 0.5, 0, 4.0, 10.0)
  done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                         str(tmp_path), "--copy_runs"], capture_output=True, text=True, timeout=120)
  assert done.returncode != 0 and "inside ROOT" in done.stderr, done.stderr
  assert sorted(os.listdir(tmp_path)) == ["ce-seed0"]  # Refused before writing anything.


@pytest.mark.parametrize("task", ["dialogue", "summarization", "style_transfer"])
def test_committed_results_trace_to_their_run_logs_and_the_docs(task, tmp_path):
  """results/<task>: the runs are the points of the config's sweep (two seeds each, same
  compute, one pretrained init), the tables regenerate from the committed run logs, and
  docs/results.md links them."""
  from configs.common import load_config
  from experiments import sweep
  results = os.path.join(ROOT, "results", task)
  runs = set(os.listdir(os.path.join(results, "runs")))
  points = report.collect(os.path.join(results, "runs"))
  # The comparison on the own 2.1 M model pretrained here (the task configs' own-model
  # sweep: `pretrained=none`).
  expected = {name for name, _ in sweep.points(load_config(
      os.path.join(ROOT, "configs", f"{task}.py") + ":pretrained=none"))}
  assert runs == expected, sorted(runs ^ expected)
  assert len(points) == 12 and all(len(p["runs"]) == 2 for p in points.values()), {
      k: len(p["runs"]) for k, p in points.items()}
  inits = set()
  for run in runs:  # every point at the same compute, from the same pretrained init
    config = json.load(open(os.path.join(results, "runs", run, "config.json")))
    assert config["num_steps"] == 300 and config["init_from"].endswith("pretrain"), run
    inits.add(config["init_from"])
  assert len(inits) == 1, inits
  report.write_tables(points, str(tmp_path))
  for name in ("summary.csv", "summary.md"):
    assert (tmp_path / name).read_text() == open(os.path.join(results, name)).read(), name
  # docs/results.md keeps this comparison short (its conclusions) and links the tables.
  with open(os.path.join(ROOT, "docs", "results.md")) as f:
    page = f.read()
  for name in ("summary.md", "metrics_vs_alpha.png", "frequency_profile.png"):
    assert f"](../results/{task}/{name})" in page, name
    assert os.path.isfile(os.path.join(results, name)), name


def test_sweep_exits_with_a_failed_points_status(tmp_path, monkeypatch):
  """A preempted point (143) ends the sweep with 143, so a retry wrapper reruns it."""
  from experiments import sweep
  ran = []

  class Done:
    def __init__(self, rc):
      self.returncode = rc

  def fake_run(argv, cwd):
    ran.append(argv)
    return Done(0 if len(ran) == 1 else -15)  # the second point gets SIGTERM

  monkeypatch.setattr(sweep.subprocess, "run", fake_run)
  monkeypatch.setattr(sys, "argv", ["sweep.py", "--config=configs/dialogue.py:smoke",
                                    f"--root={tmp_path}"])
  with pytest.raises(SystemExit) as e:
    sweep.main()
  assert e.value.code == 143 and len(ran) == 2


def test_sweep_shards_split_the_points_between_machines(tmp_path, monkeypatch, capsys):
  """--shard=I/N: the N shards together run every point once, none twice; a bad value is
  refused before anything runs, naming it."""
  from experiments import sweep
  ran = []

  class Done:
    returncode = 0

  monkeypatch.setattr(sweep.subprocess, "run", lambda argv, cwd: ran.append(argv) or Done())
  spec = "configs/dialogue.py:smoke"
  every = [argv for _, argv in sweep.commands(spec, str(tmp_path), None, [])]
  shards = []
  for i in range(3):
    ran.clear()
    monkeypatch.setattr(sys, "argv", ["sweep.py", f"--config={spec}", f"--root={tmp_path}",
                                      f"--shard={i}/3"])
    sweep.main()
    shards.append(list(ran))
  assert len(every) > 3 and all(s == every[i::3] for i, s in enumerate(shards)), shards
  assert sorted(sum(shards, [])) == sorted(every)  # together: every point, once
  monkeypatch.setattr(sys, "argv", ["sweep.py", f"--config={spec}", f"--root={tmp_path}",
                                    "--shard=1/3", "--print"])
  capsys.readouterr()  # drop the runs' progress lines above
  sweep.main()  # --print prints the shard's commands only
  assert capsys.readouterr().out.splitlines() == [shlex.join(a) for a in every[1::3]]
  monkeypatch.setattr(sys, "argv", ["sweep.py", f"--config={spec}", f"--root={tmp_path}",
                                    f"--shard={len(every)}/{len(every) + 1}"])
  sweep.main()  # more shards than points: this one has nothing to run, and says so
  assert "nothing for this shard" in capsys.readouterr().err
  ran.clear()
  for bad in ("2/2", "1", "a/b", "-1/2"):
    monkeypatch.setattr(sys, "argv", ["sweep.py", f"--config={spec}", f"--root={tmp_path}",
                                      f"--shard={bad}"])
    with pytest.raises(SystemExit) as e:
      sweep.main()
    assert e.value.code == 2 and f"--shard={bad!r}" in capsys.readouterr().err
  assert not ran


def test_report_puts_baselines_and_eos_points_in_the_same_tables(tmp_path):
  fake_run(tmp_path, "itf-seed0", "itf", 0.5, 0, 4.5, 11.0)
  fake_run(tmp_path, "alpha0.5-eos1-seed0", "pdl", 0.5, 0, 4.1, 12.5, eos_weight=1.0)
  fake_run(tmp_path, "alpha0.5-seed0", "pdl", 0.5, 0, 4.2, 12.0)
  fake_run(tmp_path, "ce-seed0", "ce", 0.5, 0, 4.0, 10.0)
  fake_run(tmp_path, "face-seed0", "face", 0.5, 0, 4.6, 10.5)
  points = report.collect(str(tmp_path))
  assert list(points) == ["ce", "alpha=0.5", "alpha=0.5,eos=1", "face", "itf"]
  report.write_tables(points, str(tmp_path))
  report.write_plots(points, str(tmp_path))
  md = (tmp_path / "summary.md").read_text()
  assert "| itf | 1 | 4.500 |" in md and "| alpha=0.5,eos=1 | 1 | 4.100 |" in md
  assert os.path.getsize(tmp_path / "metrics_vs_alpha.png") > 1000


def test_a_points_steps_come_from_its_own_config():
  """With --init_from every point trains the own model (800 steps), not the default
  pretrained finetune (60): a finished point is recognised by its own num_steps."""
  from configs import common
  from experiments import sweep
  pretrained = common.get_base_config("dialogue")
  common.use_pretrained(pretrained)
  assert pretrained.num_steps != 800
  assert sweep.point_num_steps("configs/dialogue.py:loss=ce,seed=0", []) == \
      pretrained.num_steps
  assert sweep.point_num_steps("configs/dialogue.py:init_from=w/pre,loss=ce,seed=0", []) == 800
  assert sweep.point_num_steps("configs/dialogue.py:steps=300,init_from=w/p", []) == 300
  assert sweep.point_num_steps("configs/dialogue.py:loss=ce", ["--config.num_steps=7"]) == 7


def test_paired_bootstrap_against_a_loop_and_its_coverage():
  r = np.random.default_rng(0)
  a, b = r.normal(1.0, 1.0, 60), r.normal(0.0, 1.0, 60)
  ones = np.ones(60)
  d, lo, hi = report.paired_bootstrap(a, ones, b, ones, resamples=500, seed=3)
  # The same resamples by a plain loop (numpy's generator, same seed and draw shape).
  idx = np.random.default_rng(3).integers(0, 60, (500, 60))
  diffs = [a[i].mean() - b[i].mean() for i in idx]
  assert d == pytest.approx(a.mean() - b.mean())
  assert (lo, hi) == pytest.approx(tuple(np.percentile(diffs, [2.5, 97.5])))
  # A pooled share: sum(num) / sum(den), not a mean of per-example ratios.
  num, den = np.array([1.0, 0.0, 3.0]), np.array([2.0, 1.0, 3.0])
  d, _, _ = report.paired_bootstrap(num, den, np.zeros(3), np.ones(3), resamples=10)
  assert d == pytest.approx(4.0 / 6.0)
  # Coverage: intervals of 200 independent paired samples with true difference 0.5
  # hold it about 95% of the time.
  hits = 0
  for s in range(200):
    x = r.normal(0.0, 1.0, 40)
    y = x - 0.5 + r.normal(0.0, 0.5, 40)  # paired: shared per-example variation
    _, lo, hi = report.paired_bootstrap(x, np.ones(40), y, np.ones(40), resamples=400, seed=s)
    hits += lo <= 0.5 <= hi
  assert 0.88 <= hits / 200 <= 0.99


def _samples(run_dir, name, gens, refs, rare):
  (run_dir / "samples").mkdir(exist_ok=True)
  lines = [{"index": i, "input": f"p{i}", "reference": r, "generation": g,
            "generation_ids": list(range(len(g.split()))), "rare_tokens": k}
           for i, (g, r, k) in enumerate(zip(gens, refs, rare))]
  (run_dir / "samples" / name).write_text("\n".join(json.dumps(l) for l in lines) + "\n")


def test_base_row_and_paired_intervals_from_the_samples(tmp_path):
  refs = ["the cat sat on the mat", "a dog ran far away", "birds sing at dawn"] * 4
  for seed in (0, 1):
    fake_run(tmp_path, f"ce-seed{seed}", "ce", 0.5, seed, 4.0, 10.0)
    fake_run(tmp_path, f"a0.5-seed{seed}", "pdl", 0.5, seed, 4.2, 12.0)
    for name in (f"ce-seed{seed}", f"a0.5-seed{seed}"):  # a step-0 eval in every run
      lines = open(tmp_path / name / "metrics.jsonl").read()
      (tmp_path / name / "metrics.jsonl").write_text(
          json.dumps({"step": 0, "eval/nll": 6.0, "eval/rouge1": 1.0}) + "\n" + lines)
    ce_gens = ["the cat"] * 12  # short, little overlap
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy.jsonl", ce_gens, refs, [0] * 12)
    _samples(tmp_path / f"ce-seed{seed}", "base_greedy.jsonl", ["no"] * 12, refs, [1] * 12)
    _samples(tmp_path / f"a0.5-seed{seed}", "final_greedy.jsonl", refs, refs, [1] * 12)
  points = report.collect(str(tmp_path))
  assert list(points) == [report.BASE, "ce", "alpha=0.5"]
  assert points[report.BASE]["metrics"]["eval/nll"] == [6.0, 6.0]  # the CE runs' step 0
  table = report.intervals(points)
  rows = dict(table["greedy"])
  assert list(rows) == [report.BASE, "alpha=0.5"]
  # PDL's generations equal the references: ROUGE-L 100 against CE's.
  from pdl_jax.eval import metrics as metrics_lib
  ce_rouge = metrics_lib.per_example(ce_gens, refs)["rougeL"].mean()
  d, lo, hi = rows["alpha=0.5"]["rougeL"]
  assert d == pytest.approx(100.0 - ce_rouge) and lo < d < hi
  # Rare share: PDL 1 rare token per generation over its length, CE none.
  lengths = np.array([len(r.split()) for r in refs], float)
  assert rows["alpha=0.5"]["rare_token_share"][0] == pytest.approx(12 / lengths.sum())
  assert rows["alpha=0.5"]["length"][0] == pytest.approx(lengths.mean() - 2.0)
  # Runs that disagree on the code version: a warning, or with strict an error.
  for seed, version in ((0, "abc"), (1, "def")):
    (tmp_path / f"ce-seed{seed}" / "provenance.json").write_text(
        json.dumps({"code_version": version, "base_weights_sha256": "x"}))
  with pytest.raises(SystemExit, match="differ in code_version: abc: 1 runs"):
    report.collect(str(tmp_path), strict=True)
  # Runs that evaluated different prompts (a tune-split run among validation runs).
  for seed, version in ((0, "abc"), (1, "abc")):
    (tmp_path / f"ce-seed{seed}" / "provenance.json").write_text(
        json.dumps({"code_version": version, "base_weights_sha256": "x"}))
  report.collect(str(tmp_path), strict=True)
  config = tmp_path / "ce-seed1" / "config.json"
  original = config.read_text()
  config.write_text(json.dumps({**json.loads(original), "eval": {"split": "tune"}}))
  with pytest.raises(SystemExit, match=r"differ in eval.split: 'validation': \d+ runs .*"
                                       r"'tune': 1 runs"):
    report.collect(str(tmp_path), strict=True)
  config.write_text(original)
  report.write_tables(points, str(tmp_path))
  md = open(tmp_path / "summary.md").read()
  assert "| base (step 0) | 2 |" in md and "Difference from CE per example, greedy" in md
  assert f"| alpha=0.5 | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in md


def test_samples_side_by_side_from_the_lowest_seed(tmp_path):
  """samples.md's rows: CE's lowest seed for every column (found by seed, not by folder
  order), the base from the CE run's step 0, Markdown escaped, prompts checked."""
  refs = [f"ref {i}" for i in range(8)]
  for seed in (10, 2):  # "...-seed10" sorts first: the table must still show seed 2
    fake_run(tmp_path, f"ce-seed{seed}", "ce", 0.5, seed, 4.0, 10.0)
    fake_run(tmp_path, f"a0.25-seed{seed}", "pdl", 0.25, seed, 4.1, 11.0)
    for name in (f"ce-seed{seed}", f"a0.25-seed{seed}"):
      config = json.loads((tmp_path / name / "config.json").read_text())
      config["eval"] = {"decode": "greedy"}
      (tmp_path / name / "config.json").write_text(json.dumps(config))
    lines = (tmp_path / f"ce-seed{seed}" / "metrics.jsonl").read_text()
    (tmp_path / f"ce-seed{seed}" / "metrics.jsonl").write_text(
        json.dumps({"step": 0, "eval/nll": 6.0, "eval/rouge1": 1.0}) + "\n" + lines)
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy.jsonl",
             [f"ce s{seed} {i}" for i in range(8)], refs, [0] * 8)
    _samples(tmp_path / f"ce-seed{seed}", "base_greedy.jsonl",
             [f"base s{seed} <b>{i}</b>" for i in range(8)], refs, [0] * 8)
    _samples(tmp_path / f"a0.25-seed{seed}", "final_greedy.jsonl",
             [f"pdl s{seed} | {i}\nmore_x" for i in range(8)], refs, [0] * 8)
  points = report.collect(str(tmp_path))
  assert [os.path.basename(r) for r in points["ce"]["runs"]] == ["ce-seed10", "ce-seed2"]
  lines = report.sample_lines(points, count=3)
  assert lines[2] == "| # | input | reference | base (step 0) | ce | alpha=0.25 |"
  # Seed 2's generations; a pipe, HTML and emphasis escaped, a newline joined.
  assert lines[4:] == [f"| {i} | p{i} | ref {i} | base s2 \\<b\\>{i}\\</b\\> | ce s2 {i} "
                       f"| pdl s2 \\| {i} / more\\_x |" for i in range(3)]
  assert "seed 2" in lines[0]
  assert report._cell("x" * 200, 10) == "x" * 9 + "…" and report._cell("", 5) == "(empty)"
  # Inputs keep both ends: a dialogue's cue for the next speaker is at the end.
  cut = report._cell("START " + "y" * 300 + " CUE:", 40, middle=True)
  assert cut.startswith("START") and cut.endswith("CUE:") and " … " in cut and len(cut) <= 40
  assert report._cell("a\\|b", 9) == "a\\\\\\|b"  # the backslash too: not a cell break
  # A point without the seed's generations is left out; without CE's there is no table,
  # and write_samples removes an older samples.md instead of leaving it stale.
  (tmp_path / "a0.25-seed2" / "samples" / "final_greedy.jsonl").unlink()
  assert report.sample_lines(points, count=3)[2] == "| # | input | reference | base (step 0) | ce |"
  (tmp_path / "out").mkdir()
  report.write_samples(points, str(tmp_path / "out"))
  assert (tmp_path / "out" / "samples.md").exists()
  (tmp_path / "ce-seed2" / "samples" / "final_greedy.jsonl").unlink()
  assert report.sample_lines(points) == []
  report.write_samples(points, str(tmp_path / "out"))
  assert not (tmp_path / "out" / "samples.md").exists()
  # Another prompt at the same index: the columns would not be side by side.
  _samples(tmp_path / "ce-seed2", "final_greedy.jsonl", ["g"] * 8, refs, [0] * 8)
  _samples(tmp_path / "a0.25-seed2", "final_greedy.jsonl", ["g"] * 8, refs, [0] * 8)
  text = (tmp_path / "a0.25-seed2" / "samples" / "final_greedy.jsonl").read_text()
  (tmp_path / "a0.25-seed2" / "samples" / "final_greedy.jsonl").write_text(
      text.replace('"input": "p1"', '"input": "other"'))
  with pytest.raises(SystemExit, match="alpha=0.25 evaluated another prompt 1"):
    report.sample_lines(points, count=3)


def test_bias_points_measures_and_reproduced_versions(tmp_path):
  """A CE run's logit-adjusted decodes are points ce+bias<beta> with their own
  generations and intervals; the informativeness measures get their tables; a rerun's
  code version recorded as reproduced counts as the same code."""
  from pdl_jax.eval import informativeness
  refs = ["the old king is dead", "a dog ran far away", "birds sing at dawn"] * 4
  for seed in (0, 1):
    fake_run(tmp_path, f"ce-seed{seed}", "ce", 0.5, seed, 4.0, 10.0)
    lines = [json.loads(l) for l in open(tmp_path / f"ce-seed{seed}" / "metrics.jsonl")]
    lines[-1].update({"eval/greedy_bias0.5/rouge1": 20.0 + seed,
                      "eval/top_p/rouge1": 3.0, "eval/top_p_bias0.5/rouge1": 4.0})
    (tmp_path / f"ce-seed{seed}" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(l) for l in lines) + "\n")
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy.jsonl", ["the cat"] * 12, refs,
             [0] * 12)
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy_bias0.5.jsonl",
             ["king king king dead"] * 12, refs, [1] * 12)
    (tmp_path / f"ce-seed{seed}" / "provenance.json").write_text(json.dumps(
        {"code_version": ["abc", "def"][seed], "base_weights_sha256": "x"}))
  with pytest.raises(SystemExit, match="differ in code_version"):
    report.collect(str(tmp_path), strict=True)
  (tmp_path / "reproduction.json").write_text(json.dumps(
      {"reruns": [{"rerun_code_version": "def", "equal": True}]}))
  points = report.collect(str(tmp_path), strict=True)
  assert list(points) == ["ce", "ce+bias0.5"]
  bias = points["ce+bias0.5"]
  assert bias["metrics"]["eval/rouge1"] == [20.0, 21.0]  # greedy: the main decoding
  assert bias["metrics"]["eval/top_p/rouge1"] == [4.0, 4.0]
  assert bias["metrics"]["eval/nll"] == points["ce"]["metrics"]["eval/nll"]
  stats = informativeness.WordStats.from_texts(refs + ["the cat"])
  rows = dict(report.intervals(points, stats)["greedy"])
  assert list(rows) == ["ce+bias0.5"]  # no top_p samples: no top_p rows at all
  # Every output loops ("king" x3) against none of CE's: +1 exactly.
  assert rows["ce+bias0.5"]["loop"] == (1.0, 1.0, 1.0)
  recall = rows["ce+bias0.5"]["content_recall"][0]
  assert recall == pytest.approx(8 / 40)  # king, dead in 4 refs; 40 content words in all
  report.write_tables(points, str(tmp_path), stats)
  md = open(tmp_path / "summary.md").read()
  assert "Measures that do not use the loss's token counts, greedy:" in md
  assert "| ce+bias0.5 | 2 | " in md and "| references | - | " in md
  assert "Decoded with greedy_bias0.5" not in md  # a point, not a decoding table


def test_pdl_against_its_control_of_the_same_strength(tmp_path, monkeypatch):
  """Each PDL alpha is paired with CE decoded with bias beta = alpha (and no other):
  the difference is PDL's per-example mean minus the control's, over the same prompts
  with both seeds pooled, and summary.md shows it."""
  from pdl_jax.eval import informativeness
  refs = ["the old king is dead", "a dog ran far away", "birds sing at dawn"] * 4
  for seed in (0, 1):
    for name, loss, alpha in (("ce", "ce", 0.5), ("a0.5", "pdl", 0.5), ("a1", "pdl", 1.0)):
      fake_run(tmp_path, f"{name}-seed{seed}", loss, alpha, seed, 4.0, 10.0)
    lines = [json.loads(l) for l in open(tmp_path / f"ce-seed{seed}" / "metrics.jsonl")]
    lines[-1].update({"eval/greedy_bias0.5/rouge1": 20.0, "eval/greedy_bias0.25/rouge1": 1.0,
                      "eval/greedy_bias1/rouge1": 2.0})
    (tmp_path / f"ce-seed{seed}" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(l) for l in lines) + "\n")
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy.jsonl", ["the cat"] * 12, refs, [0] * 12)
    # The control's outputs: the references for seed 0, "king king king" for seed 1.
    control = refs if seed == 0 else ["king king king"] * 12
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy_bias0.5.jsonl", control, refs, [1] * 12)
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy_bias0.25.jsonl", refs, refs, [1] * 12)
    _samples(tmp_path / f"ce-seed{seed}", "final_greedy_bias1.jsonl", refs, refs, [1] * 12)
    _samples(tmp_path / f"a0.5-seed{seed}", "final_greedy.jsonl", refs, refs, [1] * 12)
    _samples(tmp_path / f"a1-seed{seed}", "final_greedy.jsonl", refs, refs, [1] * 12)
  points = report.collect(str(tmp_path))
  stats = informativeness.WordStats.from_texts(refs)
  table = report.control_intervals(points, stats)
  # alpha=1 pairs with bias 1 (not "1.0"); bias 0.25 has no PDL point: no row.
  assert [(l, c) for l, c, _ in table["greedy"]] == [("alpha=0.5", "ce+bias0.5"),
                                                     ("alpha=1", "ce+bias1")]
  assert table["greedy"][1][2]["rougeL"][0] == pytest.approx(0.0)  # both the references
  cells = table["greedy"][0][2]
  from pdl_jax.eval import metrics as metrics_lib
  # PDL: the references twice (ROUGE-L 100); control: the references once, then loops.
  loop_rouge = metrics_lib.per_example(["king king king"] * 12, refs)["rougeL"]
  d, lo, hi = cells["rougeL"]
  assert d == pytest.approx(100.0 - (100.0 + loop_rouge.mean()) / 2) and lo <= d <= hi
  assert cells["loop"][0] == pytest.approx(-0.5)  # half the control's outputs loop
  reads = []
  real = report.example_stats
  monkeypatch.setattr(report, "example_stats",
                      lambda *a, **k: reads.append(a[:3]) or real(*a, **k))
  report.write_tables(points, str(tmp_path), stats)
  assert len(reads) == len(set(reads))  # each run's samples scored once for both tables
  md = open(tmp_path / "summary.md").read()
  assert "PDL against its control, greedy" in md
  assert f"| alpha=0.5 | ce+bias0.5 | {d:+.3f} [{lo:+.3f}, {hi:+.3f}] |" in md


@pytest.mark.parametrize("task", ["summarization", "dialogue", "style_transfer"])
def test_committed_real_model_results_trace_to_their_runs(task, tmp_path):
  """results/real/<task>: every run is a point of the task config's default sweep
  (SmolLM2-135M-Instruct) with that point's loss, seed, compute and evaluation, all from
  the same base weights and code version, each with all its final generations; the
  tables and paired intervals regenerate from the committed logs and samples, and
  docs/results.md holds them verbatim, with its plots linked."""
  from configs.common import load_config
  from experiments import sweep
  results = os.path.join(ROOT, "results", "real", task)
  config_path = os.path.join(ROOT, "configs", f"{task}.py")
  config = load_config(config_path)
  specs = dict(sweep.points(config))
  runs = set(os.listdir(os.path.join(results, "runs")))
  # Exactly the configured points, but for those whose runs are in progress (PENDING,
  # the control issue's): none missing, none extra.
  pending = {f"{p}-seed{s}" for p in PENDING[task] for s in config.sweep.seeds}
  assert runs == set(specs) - pending, (sorted(set(specs) - pending - runs),
                                        sorted(runs - set(specs)))
  # The CE points decode with the control's logit-adjusted decodes too (sweep.py adds
  # them), once their reruns are in.
  ce_control = tuple(config.eval.extra_decodes) + tuple(
      config.sweep.ce_decodes if "ce-control" not in PENDING[task] else ())

  def setting(c):  # what a point's config fixes (ml_collections dict or config.json)
    e, loss = c["eval"], c["loss"]
    return {"loss": loss["name"], "seed": c["seed"],
            "alpha": loss["alpha"] if loss["name"] == "pdl" else None,
            "eos_weight": loss["eos_weight"] if loss["name"] == "pdl" else None,
            "compute": (c["num_steps"], c["batch_size"], c["seq_len"], c["max_target_len"],
                        c["optimizer"]["learning_rate"], c["model"]["pretrained"]),
            "eval": (e["num_examples"], e["decode"], tuple(e["extra_decodes"]),
                     e["max_new_tokens"], e["top_p"], e["temperature"])}

  versions, shas = set(), set()
  for run in sorted(runs):
    d = os.path.join(results, "runs", run)
    with open(os.path.join(d, "provenance.json")) as f:
      prov = json.load(f)
    versions.add(prov["code_version"])
    shas.add(prov["base_weights_sha256"])
    with open(os.path.join(d, "config.json")) as f:
      c = json.load(f)
    want = load_config(f"{config_path}:{specs[run]}")
    if run.startswith("ce-"):
      want.eval.extra_decodes = ce_control
    assert prov["base"] == want.model.pretrained, run
    assert setting(c) == setting(want.to_dict()), run
    for method in (c["eval"]["decode"], *c["eval"]["extra_decodes"]):
      with open(os.path.join(d, "samples", f"final_{method}.jsonl")) as f:
        lines = [json.loads(line) for line in f]
      assert [x["index"] for x in lines] == list(range(c["eval"]["num_examples"])), (
          run, method)
  # One code version, or later ones whose reruns reproduced the committed generations.
  reproduced = measures.reproduced_versions(results)
  assert len(versions - reproduced) == 1 and len(shas) == 1, (versions, shas)
  points = report.collect(os.path.join(results, "runs"), strict=True, out=results)
  stats = measures.word_stats(results, points)  # the committed word_stats.json
  report.write_tables(points, str(tmp_path), stats)
  report.write_samples(points, str(tmp_path))
  for name in ("summary.csv", "summary.md", "samples.md"):
    with open(os.path.join(results, name)) as f:
      assert (tmp_path / name).read_text() == f.read(), name
  with open(os.path.join(ROOT, "docs", "results.md")) as f:
    page = f.read()
  for name in ("summary.md", "samples.md"):
    block = (f"<!-- BEGIN results/real/{task}/{name} -->\n"
             f"{(tmp_path / name).read_text()}<!-- END results/real/{task}/{name} -->")
    assert block in page, name
  for name in ("metrics_vs_alpha.png", "frequency_profile.png"):
    assert f"](../results/real/{task}/{name})" in page, name
    assert os.path.isfile(os.path.join(results, name)), name


def test_sync_readme_copies_the_named_tables(tmp_path):
  from tools import sync_readme
  (tmp_path / "a.md").write_text("| x |\n|---|\n| 1 |\n")
  text = ("intro\n<!-- BEGIN a.md -->\nstale\n<!-- END a.md -->\nafter\n"
          "<!-- BEGIN a.md -->\n<!-- END a.md -->\n")
  out = sync_readme.sync(text, str(tmp_path))
  block = "<!-- BEGIN a.md -->\n| x |\n|---|\n| 1 |\n<!-- END a.md -->"
  assert out == f"intro\n{block}\nafter\n{block}\n"
  assert sync_readme.sync(out, str(tmp_path)) == out
  with pytest.raises(FileNotFoundError, match="'b.md'"):
    sync_readme.sync("<!-- BEGIN b.md -->\n<!-- END b.md -->", str(tmp_path))


def test_sync_readme_fills_the_readme_and_every_docs_page_or_none(tmp_path):
  """One command fills the blocks of README.md and of every docs/*.md page; a block
  naming a missing file stops it before any page is written."""
  from tools import sync_readme
  (tmp_path / "docs").mkdir()
  (tmp_path / "results").mkdir()
  (tmp_path / "results" / "a.md").write_text("| x |\n")
  block = "<!-- BEGIN results/a.md -->\n{}<!-- END results/a.md -->\n"
  (tmp_path / "README.md").write_text(block.format("stale\n"))
  (tmp_path / "docs" / "results.md").write_text("# R\n" + block.format(""))
  (tmp_path / "docs" / "other.md").write_text("no blocks\n")
  pages = sync_readme.pages(str(tmp_path))
  assert [os.path.relpath(p, tmp_path) for p in pages] == [
      "README.md", os.path.join("docs", "other.md"), os.path.join("docs", "results.md")]
  done = sync_readme.sync_pages(pages, str(tmp_path))
  assert [(os.path.basename(p), n, changed) for p, n, changed in done] == [
      ("README.md", 1, True), ("other.md", 0, False), ("results.md", 1, True)]
  assert (tmp_path / "README.md").read_text() == block.format("| x |\n")
  assert (tmp_path / "docs" / "results.md").read_text() == "# R\n" + block.format("| x |\n")
  (tmp_path / "README.md").write_text(block.format("stale\n"))
  (tmp_path / "docs" / "results.md").write_text(block.replace("a.md", "b.md").format(""))
  with pytest.raises(FileNotFoundError, match=r"results\.md: block names 'results/b\.md'"):
    sync_readme.sync_pages(pages, str(tmp_path))
  assert (tmp_path / "README.md").read_text() == block.format("stale\n")  # not written
  assert not list(tmp_path.rglob("*.tmp"))


def test_the_readme_and_docs_hold_the_committed_tables():
  """Every marked block of README.md and docs/*.md is its file, verbatim: running
  tools/sync_readme.py would change nothing."""
  from tools import sync_readme
  blocks = 0
  for page in sync_readme.pages():
    with open(page) as f:
      text = f.read()
    assert sync_readme.sync(text) == text, f"{page}: run python tools/sync_readme.py"
    blocks += len(sync_readme.BLOCK.findall(text))
  assert blocks >= 6  # the real model's summary.md and samples.md of each task


def _markdown_rows(lines: list[str], start: int) -> list[list[str]]:
  """The cells of a Markdown table's body rows; lines[start] is its header."""
  rows = []
  for line in lines[start + 2:]:
    if not line.startswith("|"):
      break
    rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
  return rows


def test_readme_headline_table_is_the_committed_summaries():
  """Every number of the README's one results table is the mean, over the seeds, of its
  point's greedy metric in results/real/<task>/summary.md (and the references' rare-token
  share from its References line)."""
  tasks = ("summarization", "dialogue", "style_transfer")
  metrics = ("nll", "rougeL", "rare_token_share")
  want = {}
  for task in tasks:
    with open(os.path.join(ROOT, "results", "real", task, "summary.md")) as f:
      text = f.read()
    lines = text.splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    for row in _markdown_rows(lines, 0):  # the first table: the main (greedy) decoding
      for metric in metrics:
        want[(task, row[0], metric)] = row[header.index(metric)].split(" ± ")[0]
    refs = dict(item.rsplit(" ", 1) for item in
                text.split("References: ", 1)[1].split(".\n", 1)[0].split(", "))
    for metric in metrics:
      want[(task, "references", metric)] = refs.get(metric, "")
  with open(os.path.join(ROOT, "README.md")) as f:
    lines = f.read().splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith("| point | summarization NLL"))
  rows = _markdown_rows(lines, start)
  assert [row[0] for row in rows][:3] == ["base (step 0)", "ce", "alpha=0.25"]
  assert rows[-1][0] == "references" and len(rows) >= 5
  for row in rows:
    assert len(row) == 1 + len(tasks) * len(metrics), row
    cells = iter(row[1:])
    for task in tasks:
      for metric in metrics:
        assert next(cells) == want[(task, row[0], metric)], (row[0], task, metric)


def test_the_config_reference_names_every_field():
  """docs/experiments.md's config reference names every field of the configs."""
  from configs.common import load_config
  with open(os.path.join(ROOT, "docs", "experiments.md")) as f:
    page = f.read()
  reference = page[page.index("## The config reference"):]

  def fields(d, prefix=""):
    for key, value in d.items():
      if isinstance(value, dict):
        yield from fields(value, f"{prefix}{key}.")
      else:
        yield prefix + key

  names = set()
  for spec in ("dialogue.py", "dialogue.py:pretrained=none", "pretrain.py"):
    names |= set(fields(load_config(os.path.join(ROOT, "configs", spec)).to_dict()))
  missing = sorted(name for name in names if f"`{name}`" not in reference)
  assert not missing and len(names) > 80, missing


def test_frontier_puts_pdl_beside_ce_plus_bias(tmp_path):
  """frontier.curves: PDL by alpha and CE + bias by beta, both starting at CE, with x the
  measure of the point's own generations and y its mean metric over seeds; the
  baselines apart; frontier.png is drawn from report's measure table."""
  from experiments import frontier
  from pdl_jax.eval import informativeness
  refs = ["the old king is dead", "a dog ran far away", "birds sing at dawn"] * 4
  gens = {"ce": ["the cat"] * 12, "alpha0.5": ["old king dead"] * 12,
          "itf": ["a dog"] * 12}
  for name, loss, rouge in (("ce", "ce", 10.0), ("alpha0.5", "pdl", 12.0), ("itf", "itf", 9.0)):
    fake_run(tmp_path, f"{name}-seed0", loss, 0.5, 0, 4.0, 0.0)
    lines = [json.loads(l) for l in open(tmp_path / f"{name}-seed0" / "metrics.jsonl")]
    lines[-1]["eval/rougeL"] = rouge
    if name == "ce":
      lines[-1].update({"eval/greedy_bias0.5/rougeL": 11.0, "eval/greedy_bias1/rougeL": 8.0})
      _samples(tmp_path / "ce-seed0", "final_greedy_bias0.5.jsonl", ["king king"] * 12, refs,
               [1] * 12)
      _samples(tmp_path / "ce-seed0", "final_greedy_bias1.jsonl", ["dawn dog"] * 12, refs,
               [1] * 12)
    (tmp_path / f"{name}-seed0" / "metrics.jsonl").write_text(
        "\n".join(json.dumps(l) for l in lines) + "\n")
    _samples(tmp_path / f"{name}-seed0", "final_greedy.jsonl", gens[name], refs, [0] * 12)
  points = report.collect(str(tmp_path))
  stats = informativeness.WordStats.from_texts(refs + ["the cat"])
  measured = report.measure_table(points, stats)
  rows, _ = measured["greedy"]
  got = frontier.curves(points, rows, "eval/rougeL", "content_recall")
  assert [i[0] for i in got["pdl"]] == ["ce", "alpha=0.5"]
  assert [i[0] for i in got["bias"]] == ["ce", "ce+bias0.5", "ce+bias1"]
  assert [i[0] for i in got["other"]] == ["itf"]
  assert [i[2] for i in got["bias"]] == [10.0, 11.0, 8.0]
  # "old king dead" recalls old, king and dead of the 4 "the old king is dead" refs:
  # 12 of the references' 40 content words; "the cat" recalls none.
  assert dict((i[0], i[1]) for i in got["pdl"]) == {"ce": 0.0, "alpha=0.5": pytest.approx(12 / 40)}
  assert frontier.write_frontier(points, measured, "greedy", tmp_path / "frontier.png",
                                 report.save_png)
  assert os.path.getsize(tmp_path / "frontier.png") > 1000
  # No biased decodes: nothing to compare, no plot.
  assert not frontier.write_frontier({k: v for k, v in points.items() if "bias" not in k},
                                     {"greedy": ({k: v for k, v in rows.items()
                                                  if "bias" not in k}, {})},
                                     "greedy", tmp_path / "none.png", report.save_png)
  assert not (tmp_path / "none.png").exists()
