"""LoRA exports load in PyTorch with pdl_jax's logits: the PEFT adapter folder with
`peft.PeftModel.from_pretrained` on its base, the merged checkpoint with
`transformers.AutoModelForCausalLM`, for every family with a PEFT layout.

Two steps, two venvs (torch and peft are not project dependencies; see
make_hf_fixtures.py for the side venv, then `/work/hfvenv/bin/pip install peft`):

    # 1. random non-zero adapters (rank 4, every projection) on each fixture: the
    #    PEFT folder, the merged export, and pdl_jax's logits of base + adapters
    python tools/check_lora_export.py export /tmp/lora_export
    # 2. load each with peft / transformers and compare the logits
    /work/hfvenv/bin/python tools/check_lora_export.py check /tmp/lora_export

Step 2 prints the max absolute logit difference per export and exits non-zero above
1e-4. Last run (transformers 5.25.0, peft 0.21.2, torch 2.13.0): see docs/lora.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma3", "gemma3_mm")


def export(out: str) -> None:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  sys.path.insert(0, ROOT)
  from pdl_jax.models.hf import peft as hf_peft
  from pdl_jax.models import lora
  from pdl_jax.models import decoder
  from pdl_jax.models import config as model_config
  from pdl_jax.models.hf import export as hf_export
  from pdl_jax.models.hf import families as hf_families
  from pdl_jax.models.hf import weights as hf_weights

  os.makedirs(out, exist_ok=True)
  tokens = np.random.default_rng(0).integers(0, 250, (2, 16)).astype(np.int32)
  for family in FAMILIES:
    path = os.path.join(FIXTURES, family)
    base_cfg = hf_families.read_config(path)
    cfg = dataclasses.replace(base_cfg, lora_rank=4, lora_alpha=8.0,
                              lora_targets=tuple(model_config.LORA_TARGETS))
    model = decoder.Decoder(cfg)
    adapters = lora.split(nn.meta.unbox(model.init(
        jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))[0]
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    adapters = jax.tree.map(lambda x: x if not np.all(np.asarray(x) == 0)
                            else 0.3 * jax.random.normal(next(keys), x.shape), adapters)
    params = lora.combine(hf_weights.load_params(path, base_cfg), adapters)
    logits = np.asarray(model.apply({"params": params}, tokens)[0])
    base_logits = np.asarray(decoder.Decoder(base_cfg).apply(
        {"params": hf_weights.load_params(path, base_cfg)}, tokens)[0])
    effect = float(np.abs(logits - base_logits).max())
    assert effect > 0.1, f"{family}: the adapters barely move the logits ({effect})"
    hf_peft.write_peft(adapters, cfg, os.path.join(out, f"{family}_peft"),
                          base_name=path, tokenizer_dir=path)
    hf_export.export(lora.merge(params, cfg), base_cfg, os.path.join(out, f"{family}_merged"),
                     tokenizer_dir=path)
    np.savez(os.path.join(out, f"{family}_logits.npz"), tokens=tokens, logits=logits)
    print(f"{family}: exported; the adapters move the logits by up to {effect:.2f}")


def check(out: str) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  from peft import PeftModel  # pylint: disable=import-outside-toplevel
  from transformers import AutoModelForCausalLM  # pylint: disable=import-outside-toplevel

  worst = 0.0
  for family in FAMILIES:
    ref = np.load(os.path.join(out, f"{family}_logits.npz"))
    tokens = torch.tensor(ref["tokens"].astype(np.int64))
    peft_dir = os.path.join(out, f"{family}_peft")
    base_name = json.load(open(os.path.join(peft_dir, "adapter_config.json")))[
        "base_model_name_or_path"]
    with torch.no_grad():
      base = AutoModelForCausalLM.from_pretrained(base_name, dtype=torch.float32)
      got = {"peft": PeftModel.from_pretrained(base, peft_dir).eval()(tokens).logits,
             "merged": AutoModelForCausalLM.from_pretrained(
                 os.path.join(out, f"{family}_merged"), dtype=torch.float32).eval()(
                     tokens).logits}
    for name, logits in got.items():
      diff = float(np.abs(logits.float().numpy() - ref["logits"]).max())
      worst = max(worst, diff)
      print(f"{family} {name}: max |logits - pdl_jax| = {diff:.2e}")
  if worst > 1e-4:
    sys.exit(f"FAIL: {worst:.2e} > 1e-4")
  print("OK")


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in ("export", "check"):
    sys.exit(__doc__)
  {"export": export, "check": check}[sys.argv[1]](sys.argv[2])
