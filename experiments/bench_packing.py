"""Benchmark: packing (config.data.packing) per task: padding share and useful tokens/s.

For each task's default config (the pretrained base, its tokenizer in the chat
format, its seq_len and batch), encodes the train split, packs it
(`pdl_jax.data.packing.pack_examples`) and prints the share of padding positions before and
after and the examples per row. Then times the real train step (the config's loss,
model and optimizer; each layout with its own loss window) on random unpacked and
packed batches of the same shape, interleaved step by step, and prints the useful
(non-padding) tokens/s of each: rows a second x the split's mean real tokens a row.
Their ratio is what packing buys per second of training.

    python experiments/bench_packing.py [--tasks summarization,dialogue,style_transfer]
        [--steps 4] [--examples 20000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from configs.common import load_config
from pdl_jax.data import examples as examples_lib
from pdl_jax.data import batches as batches_lib
from pdl_jax.data import pipeline
from pdl_jax.data import packing
from pdl_jax.data import sources
from pdl_jax.train import optimizer as opt_lib
from pdl_jax import sharding
from pdl_jax.train import state as state_lib
from pdl_jax.train import step as step_lib
from pdl_jax.train import run as run_lib
from pdl_jax.losses import pdl
from pdl_jax.models import factory
from pdl_jax.models.hf import locate


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", default="summarization,dialogue,style_transfer")
  p.add_argument("--steps", type=int, default=4, help="timed steps per layout")
  p.add_argument("--examples", type=int, default=20000, help="train examples encoded")
  args = p.parse_args()
  rows = []
  for task in args.tasks.split(","):
    config = load_config(f"configs/{task}.py")
    config.model.pretrained = locate.local_dir(config.model.pretrained)
    texts = sources.load_split_texts(config.task, config.dataset, "train", args.examples)
    tokenizer = pipeline.get_tokenizer(run_lib.data_settings(config), "/tmp", lambda: texts)
    examples = pipeline.encode_split(run_lib.data_settings(config), tokenizer, texts)
    packed = packing.pack_examples(examples, pad_id=tokenizer.pad_id, loss_capacity=(
        packing.packed_capacity(config.max_target_len, config.seq_len)))
    mesh = run_lib.make_mesh(config)
    model = factory.make_model(config.model)
    tx = opt_lib.make_optimizer(config.optimizer, config.num_steps)
    rep = sharding.replicated(mesh)
    bs = sharding.named_sharding(mesh, "batch", "length")
    counts = np.bincount(examples.seqs[examples.loss_positions()],
                         minlength=model.cfg.vocab_size)
    weights = jax.device_put(pdl.power_law_weights(counts, config.loss.alpha), rep)
    # Each layout with its own loss window (unpacked: one target span a row).
    loss_fns = {"unpacked": run_lib.make_loss_fn(config, model, eos_id=tokenizer.eos_id)}
    config.data.packing = True
    loss_fns["packed"] = run_lib.make_loss_fn(config, model, eos_id=tokenizer.eos_id)
    times = {"unpacked": [], "packed": []}
    # Useful tokens a row: the split's mean (the first rows of a first-fit packing are
    # its fullest), so tokens/s = rows a second x the split's mean real tokens a row.
    useful = {"unpacked": (1 - examples_lib.padding_share(examples)) * (config.seq_len + 1),
              "packed": (1 - examples_lib.padding_share(packed)) * (config.seq_len + 1)}
    r = np.random.default_rng(0)
    with jax.set_mesh(mesh):
      state, shardings = state_lib.create_state(model, tx, mesh, 0, config.seq_len)
      steps, batches = {}, {}
      for name, ex in (("unpacked", examples), ("packed", packed)):
        steps[name] = jax.jit(
            lambda s, b, fn=loss_fns[name]: step_lib.train_step(s, b, weights, loss_fn=fn, tx=tx),
            in_shardings=(shardings, bs), out_shardings=(shardings, rep), donate_argnums=(0,))
        batches[name] = [jax.device_put(batches_lib.make_batch(
            ex, r.choice(len(ex), config.batch_size, replace=False)), bs) for _ in range(4)]
        state, m = steps[name](state, batches[name][0])  # compile + warm-up
        jax.block_until_ready(m)
      for i in range(args.steps):
        for name in times:
          t0 = time.perf_counter()
          state, m = steps[name](state, batches[name][i % 4])
          jax.block_until_ready(m)
          times[name].append(time.perf_counter() - t0)
    useful = {k: v * config.batch_size for k, v in useful.items()}
    tps = {k: useful[k] / statistics.median(v) for k, v in times.items()}
    rows.append((task, config.seq_len, examples_lib.padding_share(examples),
                 examples_lib.padding_share(packed), len(examples) / len(packed),
                 tps["unpacked"], tps["packed"]))
    print(f"{task}: {len(examples)} examples -> {len(packed)} rows", flush=True)
  print(f"jax {jax.__version__}; default configs (pretrained base, chat format), first "
        f"{args.examples} train examples; median of {args.steps} interleaved steps")
  print("| task | seq_len | padding unpacked | padding packed | examples a row | "
        "useful tokens/s unpacked | packed | speed-up |")
  print("|---|---|---|---|---|---|---|---|")
  for task, l, pad_u, pad_p, per_row, tu, tp in rows:
    print(f"| {task} | {l} | {pad_u:.0%} | {pad_p:.0%} | {per_row:.2f} | {tu:.0f} | "
          f"{tp:.0f} | {tp / tu:.2f}x |")


if __name__ == "__main__":
  main()
