"""Exports a run's params as a Hugging Face checkpoint of the architecture it was
trained as (a pretrained model's own; the project's model as Llama).

    python -m pdl_jax.export --workdir=W --out=DIR [--step=N] [--dtype=bfloat16]

Writes DIR/config.json, safetensors shards of at most 5 GB (with an index when there
are several) and the tokenizer files, into a temporary folder renamed at the end:
never a half export. `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads
it; `pdl_jax.models.hf.weights.logits(DIR, tokens)` gives its logits here.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import ml_collections

from pdl_jax import checkpoint as ckpt_lib
from pdl_jax import frequency
from pdl_jax import utils
from pdl_jax.models import factory
from pdl_jax.models.hf import export as hf_export
from pdl_jax.models.hf import offline
from pdl_jax.models.hf import weights as hf_weights


def export_run(workdir: str, out: str, *, step: int | None = None,
               dtype: str = "float32", max_shard_bytes: float = 5e9):
  """Exports WORKDIR's params (latest, or of `step`) to `out`; returns its path.

  Raises:
    FileNotFoundError: no run in `workdir` (config.json, checkpoints).
    ValueError: no such step, or an existing `out`.
  """
  root = utils.path(workdir)
  if not (root / "config.json").exists():
    raise FileNotFoundError(f"{workdir!r} has no config.json: not a run's workdir.")
  config = ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  stats = frequency.TokenStats.load(str(root / ckpt_lib.CHECKPOINTS))
  cfg = factory.model_config(config, stats.vocab_size)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
      nn.meta.unbox(hf_weights.abstract_params(cfg)))
  params = ckpt_lib.load_params(workdir, abstract, step=step)
  if config.model.pretrained is not None:
    tokenizer_dir = offline.local_dir(config.model.pretrained)
  elif config.tokenizer.path is not None:
    tokenizer_dir = str(utils.path(config.tokenizer.path).parent)
  else:
    tokenizer_dir = str(utils.path(config.init_from or workdir))
  return hf_export.export(params, cfg, out, dtype=dtype, tokenizer_dir=tokenizer_dir,
                           max_shard_bytes=max_shard_bytes)


def main(argv) -> None:
  """CLI: --workdir, --out, --step, --dtype (see export_run)."""
  del argv
  from absl import flags

  f = flags.FLAGS
  path = export_run(f.workdir, f.out, step=f.step, dtype=f.dtype)
  print(f"exported {f.workdir} to {path}")


if __name__ == "__main__":
  from absl import app, flags

  flags.DEFINE_string("workdir", None, "the run's workdir")
  flags.DEFINE_string("out", None, "the Hugging Face checkpoint folder to write (new)")
  flags.DEFINE_integer("step", None, "checkpoint step; default the latest")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "tensor dtype")
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
