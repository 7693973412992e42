"""Pretraining: the same model as a plain LM on the text of all three offline corpora.

Its workdir is the `init_from` of the finetuning runs (which then also use its
tokenizer):

    python -m pdl_jax.main --config=configs/pretrain.py --workdir=workdirs/pretrain
    python -m pdl_jax.main --config=configs/dialogue.py:init_from=workdirs/pretrain
"""

from configs import common


def get_config(arg: str | None = None):
  c = common.get_base_config("pretrain")
  c.loss.name = "ce"  # Plain LM.
  c.max_target_len = 128  # The whole document is the target: loss on every token.
  c.num_steps = 2000  # About half an epoch of the ~105k documents.
  c.eval.decode = "greedy"  # Unused: pretraining evaluates NLL only.
  c.sweep.alphas = ()  # Pretraining is not swept.
  c.sweep.include_ce = False  # No CE point either.
  return common.parse_arg(c, arg)
