"""Runs a config's sweep: CE, PDL alphas, PDL with EOS weight 1, baselines, x seeds,
one run after another.

    python experiments/sweep.py --config=configs/dialogue.py[:args] --root=workdirs/dialogue \
        [--only=ce,alpha0.25] [--init_from=workdirs/pretrain] [--shard=I/N] [--print]

Points come from the config's own `sweep` section (alphas, seeds, include_ce); every
point gets the same config (same steps, batch, model: the same compute) apart from
the loss, alpha and seed. Each point is `python -m pdl_jax.main` in ROOT/<point>-seed<s>
(ROOT may be gs://): finished points (their final eval, at num_steps, is in
metrics.jsonl) are skipped and interrupted ones resume, since running the same
command again resumes (and writes a final eval a killed run missed). --print only prints the commands (for
TPU VMs, `./launch.sh tpu sweep` runs them there). --only=NAME,... runs only the named
points (their folder names without -seedS: ce, alpha0.25, alpha0.5-eos1, itf, ...; an
unknown name is an error listing the sweep's points), every seed of each. The CE
points also decode with the config's sweep.ce_decodes (logit-adjusted decodings such
as greedy_bias0.25: PDL's free control) as extra decodes.

Flags after the known ones go to every point (e.g. --config.num_steps=30); flags that
would change the sweep itself (--config.sweep.*) are refused: the points come from
the config file and its argument, and use --only to pick some.

--shard=I/N runs only points I, I+N, I+2N, ... (0 <= I < N): N independent machines (or
processes, each on its own cores) given the same command and ROOT (same --config and
code: the points must be the same list) and shards 0/N .. N-1/N run the whole sweep
once between them, with no two running the same point (two sweeps without
--shard on one ROOT would run the same point into the same folder at once).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
from configs.common import load_config
from pdl_jax.train import metric_writer


def points(config) -> list[tuple[str, str]]:
  """[(folder name, config argument items)] of the sweep, per seed: CE, PDL at each
  alpha, PDL with EOS at the weight of an average token (sweep.eos_weight_alphas:
  separates PDL's effect on word choice from its effect on length), then one point per
  baseline loss (sweep.baselines), all at the same compute and init."""
  sweep = config.sweep
  out = []
  for seed in sweep.seeds:
    if sweep.include_ce:
      out.append((f"ce-seed{seed}", f"loss=ce,seed={seed}"))
    for alpha in sweep.alphas:
      out.append((f"alpha{alpha:g}-seed{seed}", f"loss=pdl,alpha={alpha},seed={seed}"))
    for alpha in sweep.eos_weight_alphas:
      out.append((f"alpha{alpha:g}-eos1-seed{seed}",
                  f"loss=pdl,alpha={alpha},eos_weight=1,seed={seed}"))
    for name in sweep.baselines:
      out.append((f"{name}-seed{seed}", f"loss={name},seed={seed}"))
  return out


def point_name(folder: str) -> str:
  """A point's name: its folder name without the seed ("alpha0.25-seed1" ->
  "alpha0.25")."""
  return folder.rpartition("-seed")[0]


def select(every: list[tuple[str, list[str]]], only: str | None
           ) -> list[tuple[str, list[str]]]:
  """The commands of the points named in `only` (comma-separated point names; an
  "alpha=0.25" form is read as "alpha0.25"), all of them for None.

  Raises:
    ValueError: an unknown name, listing the sweep's point names.
  """
  if not only:
    return every
  names = list(dict.fromkeys(point_name(w.rstrip("/").rpartition("/")[2]) for w, _ in every))
  wanted = [n.strip().replace("=", "") for n in only.split(",") if n.strip()]
  unknown = [n for n in wanted if n not in names]
  if unknown or not wanted:
    raise ValueError(f"--only={only!r}: unknown point(s) {unknown}; this sweep's points "
                     f"are {names}.")
  return [(w, a) for w, a in every
          if point_name(w.rstrip("/").rpartition("/")[2]) in wanted]


def check_extra(extra: list[str]) -> None:
  """Refuses flags a point cannot apply: --config.sweep.* (the sweep is the config
  file's; forwarded to each point they would change nothing) and stray words.

  Raises:
    ValueError: naming the flag.
  """
  for flag in extra:
    if flag.startswith("--config.sweep."):
      raise ValueError(f"{flag!r} would be passed to every point, where it changes "
                       "nothing: the sweep's points come from the config file and its "
                       "argument; pick points with --only=NAME,... .")
    if not flag.startswith("--"):
      raise ValueError(f"unexpected argument {flag!r}; sweep.py passes only --flags "
                       "(e.g. --config.num_steps=30) to its points.")


def point_num_steps(point_spec: str, extra: list[str]) -> int:
  """num_steps of one point: its own config (the base model, and so the defaults,
  depend on its arguments: init_from= picks the own model) or a --config.num_steps
  flag among the extra ones."""
  steps = load_config(point_spec).num_steps
  for flag in extra:
    if flag.startswith("--config.num_steps="):
      steps = int(flag.partition("=")[2])
  return steps


def commands(spec: str, root: str, init_from: str | None, extra: list[str]) -> list[tuple[str, list[str]]]:
  """[(workdir, argv)] of every point."""
  config = load_config(spec)
  path, _, arg = spec.partition(":")
  base = f"{arg}," if arg else ""
  if init_from:
    base += f"init_from={init_from},"
  out = []
  for name, items in points(config):
    workdir = f"{root.rstrip('/')}/{name}"  # local or gs://
    # The base model's eval at step 0 is the same for every point: only the CE points
    # run it (report.py's base row); the others start training at once.
    base_eval = ["--config.eval.at_start=False"] if (
        config.model.pretrained is not None and config.eval.get("at_start") is None
        and not name.startswith("ce-")) else []
    # CE's logit-adjusted decodes: the control points come from the CE runs.
    ce_decodes = config.sweep.get("ce_decodes", ())
    if ce_decodes and name.startswith("ce-"):
      decodes = tuple(config.eval.extra_decodes) + tuple(ce_decodes)
      base_eval.append(f"--config.eval.extra_decodes={decodes!r}")
    out.append((workdir, [sys.executable, "-m", "pdl_jax.main", f"--config={path}:{base}{items}",
                          f"--workdir={workdir}", *base_eval, *extra]))
  return out


def parse_shard(shard: str) -> tuple[int, int]:
  """'I/N' -> (I, N); a clear error for anything that is not 0 <= I < N."""
  index, _, count = shard.partition("/")
  try:
    i, n = int(index), int(count)
  except ValueError:
    i, n = -1, 0
  if not 0 <= i < n:
    raise ValueError(f"--shard={shard!r}: expected I/N with 0 <= I < N, e.g. 0/2 and 1/2 "
                     "for two machines")
  return i, n


def is_finished(workdir: str, num_steps: int) -> bool:
  """True when the run's final eval (at num_steps) is in its metrics.jsonl: a run
  killed after its last checkpoint but before that eval is not finished."""
  return metric_writer.eval_at(workdir, num_steps) is not None


def run_points(todo: list[tuple[str, list[str]]], extra: list[str]) -> None:
  """Runs each point of `todo` ([(workdir, argv)]) one after the other, skipping
  finished ones (an interrupted one resumes); a point that fails ends the process with
  its status."""
  for i, (workdir, argv) in enumerate(todo):
    point_spec = next(a for a in argv if a.startswith("--config="))[len("--config="):]
    if is_finished(workdir, point_num_steps(point_spec, extra)):
      print(f"[{i + 1}/{len(todo)}] {workdir}: finished, skipped", flush=True)
      continue
    print(f"[{i + 1}/{len(todo)}] {shlex.join(argv)}", flush=True)
    rc = subprocess.run(argv, cwd=ROOT).returncode
    if rc:
      # The point's own status: 143 (preempted, SIGTERM: checkpoint saved) lets a
      # wrapper such as `./launch.sh job` rerun the sweep, which resumes this point.
      print(f"[{i + 1}/{len(todo)}] {workdir}: exited with status {rc}; run the same "
            "command to resume", file=sys.stderr, flush=True)
      sys.exit(rc if 0 < rc < 256 else 128 + (-rc if rc < 0 else 1))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True, help="configs/<task>.py[:args]")
  p.add_argument("--root", required=True, help="folder of the sweep's run folders")
  p.add_argument("--init_from", default=None, help="pretrained run every point starts from")
  p.add_argument("--shard", default="0/1",
                 help="I/N: run only points I, I+N, ... (split a sweep over N machines)")
  p.add_argument("--print", action="store_true", help="only print the commands")
  p.add_argument("--only", default=None,
                 help="comma-separated point names (ce, alpha0.25, itf, ...): run only these")
  args, extra = p.parse_known_args()
  try:
    shard, num_shards = parse_shard(args.shard)
    check_extra(extra)
  except ValueError as e:
    p.error(str(e))  # before the config is even loaded
  try:
    every = select(commands(args.config, args.root, args.init_from, extra), args.only)
  except ValueError as e:
    p.error(str(e))
  todo = every[shard::num_shards]
  if not todo:  # more shards than points: say so rather than "done"
    print(f"--shard={args.shard}: the sweep has only {len(every)} points; nothing for "
          "this shard", file=sys.stderr)
    return
  if args.print:
    for _, argv in todo:
      print(shlex.join(argv))
    return
  run_points(todo, extra)
  print(f"done; report: python experiments/report.py {args.root}")


if __name__ == "__main__":
  main()
