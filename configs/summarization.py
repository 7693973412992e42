"""Summarization: a Debian package's one-line synopsis from its long description.

    python -m pdl_jax.main --config=configs/summarization.py
    python -m pdl_jax.main --config=configs/summarization.py:smoke --workdir=/tmp/sum
    python -m pdl_jax.main --config=configs/summarization.py:dataset=xsum   # internet
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config("summarization")
  c.dataset.name = "debian_descriptions"  # Or "cnn_dailymail", "xsum" (internet).
  c.seq_len = 128  # Descriptions: median 46 words; long ones keep their end.
  c.max_target_len = 24  # Synopses: median 6 words.
  c.eval.max_new_tokens = 24  # Synopses are short.
  c.sweep.alphas = (0.25, 0.5, 1.0)  # The summarization sweep (alpha 0 is CE: the `ce` point).
  c.sweep.seeds = (0, 1)  # Two seeds for every point: the seed-to-seed spread.
  c.sweep.eos_weight_alphas = (0.5,)  # PDL 0.5 with EOS weight 1: word choice vs length.
  c.sweep.baselines = common.BASELINES  # The frequency-aware and anti-dullness baselines.
  if common.wants_pretrained(arg):  # The default: finetune SmolLM2-135M-Instruct.
    common.use_pretrained(c)
    # Its tokenizer, chat format: synopses median 9 tokens, 99th percentile 20 (32
    # truncates 0.04%); descriptions median 73 tokens, 90th percentile 156.
    c.seq_len = 192  # 30 of them are the chat template's; ~130 are left for the description.
    c.max_target_len = 32  # Synopses up to 32 tokens (+ end of turn).
    c.eval.max_new_tokens = 32  # Synopses are short.
    c.sweep.alphas = (0.25, 0.5, 1.0)  # The full set on the real model: alpha 1 too,
    c.sweep.baselines = common.BASELINES + common.RECENT_BASELINES  # and FACE, TLAT-chi2, unlikelihood, focal, DFT, GEM, MiLe.
  return common.parse_arg(c, arg)
