"""Dialogue: the next turn of a Shakespeare scene from the last three turns.

    python -m pdl_jax.main --config=configs/dialogue.py
    python -m pdl_jax.main --config=configs/dialogue.py:smoke --workdir=/tmp/dlg
    python -m pdl_jax.main --config=configs/dialogue.py:loss=ce
    python -m pdl_jax.main --config=configs/dialogue.py --config.loss.alpha=0.5
    python experiments/sweep.py --config=configs/dialogue.py   # the alpha sweep below
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config("dialogue")
  c.dataset.name = "shakespeare_dialogue"  # Or "gem/schema_guided_dialog" (internet).
  c.seq_len = 128  # Three turns of context; long ones lose their start.
  c.max_target_len = 40  # Turns are short; long speeches are cut.
  c.sweep.alphas = (0.25, 0.5, 1.0)  # The dialogue sweep (alpha 0 is CE: the `ce` point).
  c.sweep.seeds = (0, 1)  # Two seeds here: the seed-to-seed spread docs/results.md reports.
  c.sweep.eos_weight_alphas = (0.5,)  # PDL 0.5 with EOS weight 1: word choice vs length.
  c.sweep.baselines = common.BASELINES  # The frequency-aware and anti-dullness baselines.
  if common.wants_pretrained(arg):  # The default: finetune SmolLM2-135M-Instruct.
    common.use_pretrained(c)
    # Its tokenizer, chat format: turns median 17 tokens, 95th percentile 123; 128
    # truncates 4.9% of the train targets. The prompt keeps its last ~100 tokens.
    c.seq_len = 256  # 30 of them are the chat template's (system prompt, turn markers).
    c.max_target_len = 128  # Replies up to 128 tokens (+ end of turn).
    c.eval.max_new_tokens = 48  # Generations longer than that are cut for the metrics.
    c.sweep.alphas = (0.25, 0.5, 1.0)  # The full set on the real model, as the other tasks:
    c.sweep.baselines = common.BASELINES + common.RECENT_BASELINES  # alpha 1, all baselines.
  return common.parse_arg(c, arg)
