"""Benchmark: the generation half of one evaluation, prompts bucketed by length
against decoded in order, on a task's real validation prompts.

What an evaluation decodes (config.eval: its num_examples prompts, batch_size,
max_new_tokens, greedy and top-p): `pdl_jax.eval.evaluator.generate_all` with
eval.length_bucket = 0 (in order, every batch padded to the longest prompt: one
compiled decoder per method) and with each bucket given (prompts in order of length,
each batch padded to a multiple of the bucket: one decoder per distinct length).
The first call of each variant is reported alone (it compiles its decoders, once per
run in training); then repeats interleaved, medians printed with the ratio to the
in-order variant measured in the same process. It also counts the generations equal
to the in-order ones, for greedy and for top-p (whose draws are keyed per prompt):
padding changes the float rounding of attention sums, which can flip a near-tie.

    PDL_JAX_CACHE=... python experiments/bench_eval.py --config=configs/dialogue.py \\
        [--buckets 32 64] [--repeats 2] [--num_examples 256]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax
import numpy as np

from configs.common import load_config
from pdl_jax.data import pipeline
from pdl_jax.data import sources
from pdl_jax.eval import evaluator as evaluator_lib
from pdl_jax.train import run as run_lib
from pdl_jax.models.hf import locate
from pdl_jax.models.hf import weights as hf_weights


def main() -> None:
  """Parses the flags, loads the prompts and the model, prints the timings."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--config", default="configs/dialogue.py")
  ap.add_argument("--buckets", type=int, nargs="+", default=[64])
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--methods", nargs="+", default=None,
                  help="decodings to time (default: the config's eval.decode and "
                       "eval.extra_decodes)")
  ap.add_argument("--num_examples", type=int, default=None,
                  help="evaluation prompts (default: the config's eval.num_examples)")
  args = ap.parse_args()
  config = load_config(args.config)
  if args.num_examples:
    config.eval.num_examples = args.num_examples
  if config.model.pretrained is None:
    raise SystemExit(f"{args.config} has no model.pretrained: this benchmark decodes a "
                     "pretrained model.")
  scratch = tempfile.mkdtemp()  # get_tokenizer's workdir: unused for a pretrained model
  tok = pipeline.get_tokenizer(run_lib.data_settings(config), scratch, None)
  shutil.rmtree(scratch, ignore_errors=True)
  ex = pipeline.encode_split(run_lib.data_settings(config), tok, sources.load_split_texts(
      config, "validation", config.eval.num_examples))
  prompts = evaluator_lib.prompt_ids(ex)
  model, params = hf_weights.load(locate.local_dir(config.model.pretrained))
  mesh = run_lib.make_mesh(config)
  lengths = [len(p) for p in prompts]
  eos_ids, banned = evaluator_lib.stop_and_banned_ids(tok, model.cfg.vocab_size)
  e = config.eval
  print(f"{args.config}: {len(prompts)} prompts, lengths median {np.median(lengths):.0f}, "
        f"max {max(lengths)}; batch {e.batch_size}, {e.max_new_tokens} new tokens; "
        f"jax {jax.__version__} {jax.devices()[0].platform}", flush=True)
  variants = [0, *args.buckets]
  for b in variants:
    shapes = sorted({n for _, n in evaluator_lib.decode_batches(lengths, e.batch_size, b)})
    padded = sum(n * e.batch_size for _, n in evaluator_lib.decode_batches(lengths, e.batch_size, b))
    print(f"  bucket {b}: padded lengths {shapes}, prompt positions {padded} "
          f"({sum(lengths)} real)")

  def run(method: str, bucket: int) -> tuple[float, list[list[int]]]:
    t0 = time.perf_counter()
    out = evaluator_lib.generate_all(
        model, params, prompts, mesh, jax.random.key(config.seed + 1), method=method,
        batch_size=e.batch_size, length_bucket=bucket, max_new_tokens=e.max_new_tokens,
        eos_ids=eos_ids, pad_id=tok.pad_id, banned_ids=banned, top_p=e.top_p,
        temperature=e.temperature)
    return time.perf_counter() - t0, out

  for method in args.methods or (e.decode, *e.extra_decodes):
    first, outs, times = {}, {}, {b: [] for b in variants}
    for b in variants:
      first[b], outs[b] = run(method, b)
    for _ in range(args.repeats):
      for b in variants:
        times[b].append(run(method, b)[0])
    base = statistics.median(times[0])
    for b in variants:
      med = statistics.median(times[b])
      same = sum(x == y for x, y in zip(outs[b], outs[0]))
      print(f"{method:7s} bucket {b:3d}: first call (compiles) {first[b]:6.1f} s, then "
            f"median {med:6.1f} s ({base / med:.2f}x in order); generations equal to "
            f"in order: {same}/{len(prompts)}", flush=True)


if __name__ == "__main__":
  main()
