"""The frequency pass alone: counts (and the most and least frequent tokens) of a
config's training targets, written where a run would write them.

    python -m pdl_jax.cli.count_tokens --config=configs/<task>.py --workdir=DIR [--top=N]
"""

from __future__ import annotations

from pdl_jax.data import pipeline
from pdl_jax import paths
from pdl_jax.data import token_stats
from pdl_jax.losses import weights as loss_weights
from pdl_jax.train import run as run_lib
from pdl_jax.cli import errors


def run_pass(cfg, workdir: str, top: int = 0) -> tuple[token_stats.TokenStats, str]:
  """The frequency pass of a run config only: tokenizer (trained once in the
  workdir), counts of the train targets and the loss weights, stored where training
  with the same workdir reuses them. Returns the stats and a report (with the `top`
  most and least frequent tokens and their weights)."""
  from pdl_jax import config_checks

  config_checks.validate_config(cfg)
  data = run_lib.data_settings(cfg)
  tokenizer, train_ex, vocab_size = pipeline.prepare_train(data, workdir)
  stats = token_stats.prepare_stats(data, workdir, tokenizer, train_ex, vocab_size)
  weights_V = loss_weights.prepare_weights(cfg.loss, workdir, stats, resuming=False,
                                           eos_id=tokenizer.eos_id)
  path = paths.path(workdir) / "checkpoints"
  report = (f"{stats.dataset} {stats.split} {list(stats.fields)}: {stats.num_examples} "
            f"examples, {stats.num_tokens} tokens, vocab {stats.vocab_size}; stats and "
            f"weights in {path}")
  if top:
    report += f"\nweights at alpha={cfg.loss.alpha}:\n" + token_stats.most_and_least_frequent(
        stats, tokenizer, top, weights_V)
  return stats, report


def main(argv) -> None:
  """CLI: --config, --workdir, --top (see run_pass)."""
  del argv
  from absl import flags

  print(run_pass(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.top)[1])

if __name__ == "__main__":
  from absl import flags
  from ml_collections import config_flags

  config_flags.DEFINE_config_file("config", None, "configs/<task>.py[:args]")
  flags.DEFINE_string("workdir", None, "the run's workdir (stats go to its checkpoints/)")
  flags.DEFINE_integer("top", 0, "print the N most and least frequent tokens")
  flags.mark_flags_as_required(["config", "workdir"])
  errors.run(main)
