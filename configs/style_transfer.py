"""Style transfer: a King James verse rewritten in modern (World English Bible) style.

    python -m pdl_jax.main --config=configs/style_transfer.py
    python -m pdl_jax.main --config=configs/style_transfer.py:smoke --workdir=/tmp/st
    python -m pdl_jax.main --config=configs/style_transfer.py:dataset=bible_style/web_to_kjv
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config("style_transfer")
  c.dataset.name = "bible_style"  # KJV -> WEB; "bible_style/web_to_kjv" reverses it;
  # "gem/wiki_auto_asset_turk" needs the internet.
  c.seq_len = 128  # Most verses are under 60 tokens in either version.
  c.max_target_len = 60  # Whole verses but the longest.
  c.eval.max_new_tokens = 60  # Whole verses but the longest.
  c.sweep.alphas = (0.25, 0.5, 1.0)  # The style-transfer sweep (alpha 0 is CE: the `ce` point).
  c.sweep.seeds = (0, 1)  # Two seeds for every point: the seed-to-seed spread.
  c.sweep.eos_weight_alphas = (0.5,)  # PDL 0.5 with EOS weight 1: word choice vs length.
  c.sweep.baselines = common.BASELINES  # The frequency-aware and anti-dullness baselines.
  if common.wants_pretrained(arg):  # The default: finetune SmolLM2-135M-Instruct.
    common.use_pretrained(c)
    # Its tokenizer, chat format: verses median 28 tokens, 99th percentile 69 (72
    # truncates about 1%); KJV prompts 99th percentile 79.
    c.seq_len = 192  # 30 of them are the chat template's.
    c.max_target_len = 72  # Whole verses but the longest (+ end of turn).
    c.eval.max_new_tokens = 72  # Whole verses but the longest.
    c.sweep.alphas = (0.25, 0.5, 1.0)  # The full set on the real model, as summarization's:
    c.sweep.baselines = common.BASELINES + common.RECENT_BASELINES  # alpha 1 too, and FACE, TLAT-chi2, unlikelihood, focal, DFT, GEM, MiLe.
  return common.parse_arg(c, arg)
