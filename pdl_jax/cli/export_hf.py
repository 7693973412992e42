"""Exports a run's params as a Hugging Face checkpoint of the architecture it was
trained as (a pretrained model's own; the project's model as Llama).

    python -m pdl_jax.cli.export_hf --workdir=W --out=DIR [--step=N] [--dtype=bfloat16]

Writes DIR/config.json, safetensors shards of at most 5 GB (with an index when there
are several) and the tokenizer files, into a temporary folder renamed at the end:
never a half export. `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads
it; `pdl_jax.models.hf.weights.logits(DIR, tokens)` gives its logits here.

A LoRA run (model.lora.rank > 0) exports its adapters as a PEFT adapter folder
(adapter_config.json, adapter_model.safetensors in PEFT's names, the tokenizer
files): `peft.PeftModel.from_pretrained(base, DIR)` loads it on the base. With
--merge it writes the merged full checkpoint instead (each adapter folded into the
float base, W + (alpha / r) A B), as for a full finetune.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import flax.linen as nn
import jax
import ml_collections
from pdl_jax.train import checkpoint as ckpt_lib
from pdl_jax.data import token_stats
from pdl_jax.models import lora
from pdl_jax import paths
from pdl_jax.models import factory
from pdl_jax.models.hf import export as hf_export
from pdl_jax.models.hf import locate
from pdl_jax.models.hf import weights as hf_weights
from pdl_jax.models.hf import peft as hf_peft
from pdl_jax.cli import errors


def export_run(workdir: str, out: str, *, step: int | None = None,
               dtype: str = "float32", max_shard_bytes: float = 5e9, merge: bool = False):
  """Exports WORKDIR's params (latest, or of `step`) to `out`; returns its path.
  A LoRA run: a PEFT adapter folder, or with `merge` the merged checkpoint.

  Raises:
    FileNotFoundError: no run in `workdir` (config.json, checkpoints).
    ValueError: no such step, an existing `out`, or --merge of a full finetune.
  """
  root = paths.path(workdir)
  if not (root / "config.json").exists():
    raise FileNotFoundError(f"{workdir!r} has no config.json: not a run's workdir.")
  config = ml_collections.ConfigDict(json.loads((root / "config.json").read_text()))
  stats = token_stats.TokenStats.load(str(root / ckpt_lib.CHECKPOINTS))
  cfg = factory.decoder_config(config.model, stats.vocab_size)
  if merge and not lora.enabled(cfg):
    raise ValueError(f"--merge folds a LoRA run's adapters into its base; {workdir!r} is a "
                     "full finetune (export it without --merge).")
  if lora.enabled(cfg):
    return _export_lora(config, cfg, workdir, out, step=step, dtype=dtype,
                        max_shard_bytes=max_shard_bytes, merge=merge)
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
      nn.meta.unbox(hf_weights.abstract_params(cfg)))
  params = ckpt_lib.load_params(workdir, abstract, step=step)
  if config.model.pretrained is not None:
    tokenizer_dir = locate.local_dir(config.model.pretrained)
  elif config.tokenizer.path is not None:
    tokenizer_dir = str(paths.path(config.tokenizer.path).parent)
  else:
    tokenizer_dir = str(paths.path(config.init_from or workdir))
  return hf_export.export(params, cfg, out, dtype=dtype, tokenizer_dir=tokenizer_dir,
                           max_shard_bytes=max_shard_bytes)


def _export_lora(config, cfg, workdir: str, out: str, *, step, dtype: str,
                 max_shard_bytes: float, merge: bool):
  """A LoRA run's PEFT adapter folder, or (merge) its merged full checkpoint."""
  one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one_device),
      nn.meta.unbox(lora.split(hf_weights.abstract_params(cfg))[0]))
  adapters = ckpt_lib.load_params(workdir, abstract, step=step)
  tokenizer_dir = locate.local_dir(config.model.pretrained)
  check_base(workdir, tokenizer_dir, step)
  # An offline model's name or a GGUF file means nothing to transformers: the folder it
  # was converted to is the exact base (SmolLM2's is the GGUF's Q4_1 weights, not the
  # Hub's). A Hub id or a folder is what transformers reads too.
  base_name = (str(tokenizer_dir)
               if locate.kind(config.model.pretrained) in ("name", "gguf")
               else config.model.pretrained)
  if merge:
    # Folded into the float base, not the quantised one the run computed with: the
    # model people serve (a QLoRA run's merged logits differ by the base's rounding).
    plain = dataclasses.replace(cfg, lora_rank=0, lora_targets=(), base_quant="none",
                                param_dtype="float32")
    base = hf_weights.load_params(tokenizer_dir, plain)
    merged = jax.jit(functools.partial(
        lora.merge, cfg=dataclasses.replace(cfg, base_quant="none")))(
            lora.combine(base, adapters))
    return hf_export.export(merged, plain, out, dtype=dtype, tokenizer_dir=tokenizer_dir,
                             max_shard_bytes=max_shard_bytes)
  return hf_peft.write_peft(adapters, cfg, out, base_name=base_name, tokenizer_dir=tokenizer_dir,
                    dtype=dtype)


def check_base(workdir: str, model_dir: str, step: int | None) -> None:
  """A LoRA run's adapters are exported only against the base they were trained on.

  Raises:
    ValueError: the weights now at the base's path have another checksum than the
      one the run's checkpoint recorded.
  """
  _, meta = ckpt_lib.read_meta(workdir, step)
  recorded = meta["fingerprint"].get("lora_base_weights_sha256")
  now = hf_weights.base_weights_sha256(model_dir)
  if recorded is not None and recorded != now:
    raise ValueError(
        f"{workdir!r}: its adapters were trained on a base of weights checksum "
        f"{recorded[:16]}..., but {meta.get('lora_base', model_dir)!r} now holds weights of "
        f"checksum {now[:16]}...; export against the base the run used.")


def main(argv) -> None:
  """CLI: --workdir, --out, --step, --dtype (see export_run)."""
  del argv
  from absl import flags, logging

  logging.set_verbosity(logging.WARNING)  # orbax logs each restore step at INFO
  f = flags.FLAGS
  path = export_run(f.workdir, f.out, step=f.step, dtype=f.dtype, merge=f.merge)
  print(f"exported {f.workdir} to {path}")

if __name__ == "__main__":
  from absl import flags

  flags.DEFINE_string("workdir", None, "the run's workdir")
  flags.DEFINE_string("out", None, "the Hugging Face checkpoint folder to write (new)")
  flags.DEFINE_integer("step", None, "checkpoint step; default the latest")
  flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "tensor dtype")
  flags.DEFINE_bool("merge", False, "LoRA run: write the merged full checkpoint, not a "
                    "PEFT adapter folder")
  flags.mark_flags_as_required(["workdir", "out"])
  errors.run(main)
