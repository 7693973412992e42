"""Exported checkpoints load in PyTorch transformers with the reference logits.

Two steps, two venvs (torch is not a project dependency; see make_hf_fixtures.py):

    # 1. export every fixture (float32, bfloat16, one sharded) and the own model
    python tools/check_hf_export.py export /tmp/hf_export
    # 2. load each with transformers.AutoModelForCausalLM and compare the logits
    /work/hfvenv/bin/python tools/check_hf_export.py check /tmp/hf_export

Step 2 prints the max relative error per export and exits non-zero when a float32
export is off by more than 1e-5 or a bfloat16 one by more than 5e-2 (rounding the
weights to bfloat16). Last run (transformers 5.25.0, torch 2.13.0): every float32
fixture export 0.0 (bit-identical logits; gemma3_mm, multimodal, as its text model),
bfloat16 2e-3..1.2e-2, the own model
exported as Llama 2.9e-7.
"""

from __future__ import annotations

import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "hf")


def export(out: str) -> None:
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from pdl_jax.models import decoder
  from pdl_jax.models import config as model_config
  # pylint: disable=import-outside-toplevel
  from pdl_jax.models.hf import export as hf_export
  from pdl_jax.models.hf import families as hf_families
  from pdl_jax.models.hf import weights as hf_weights
  for name in sorted(os.listdir(FIXTURES)):
    src = os.path.join(FIXTURES, name)
    cfg = hf_families.read_config(src)
    params = hf_weights.load_params(src, cfg)
    hf_export.export(params, cfg, os.path.join(out, name), tokenizer_dir=src,
                      max_shard_bytes=60_000 if name == "gpt2" else 5e9)
    hf_export.export(params, cfg, os.path.join(out, name + "_bf16"), dtype="bfloat16")
    np.savez(os.path.join(out, name + ".npz"), **np.load(os.path.join(src, "reference.npz")))
  own_cfg = model_config.preset_config("tiny", vocab_size=96, num_layers=2)
  own = decoder.Decoder(model_config.from_model_config(own_cfg))
  tokens = np.random.default_rng(0).integers(0, 96, (2, 7)).astype(np.int32)
  params = nn.meta.unbox(own.init(jax.random.key(1), tokens)["params"])
  logits, _ = own.apply({"params": params}, tokens)
  np.savez(os.path.join(out, "own.npz"), tokens=tokens, logits=np.asarray(logits))
  hf_export.export(params, model_config.from_model_config(own_cfg), os.path.join(out, "own"))


def check(out: str) -> int:
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  bad = 0
  for ref_file in sorted(f for f in os.listdir(out) if f.endswith(".npz")):
    name = ref_file[:-4]
    ref = np.load(os.path.join(out, ref_file))
    for suffix, tol in (("", 1e-5), ("_bf16", 5e-2)):
      path = os.path.join(out, name + suffix)
      if not os.path.isdir(path):
        continue
      model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
      with torch.no_grad():
        logits = model.eval()(torch.from_numpy(ref["tokens"]).long()).logits.numpy()
      err = float(np.abs(logits - ref["logits"]).max() / np.abs(ref["logits"]).max())
      bad += err > tol
      print(f"{name + suffix:24s} max rel err {err:.3g} {'OK' if err <= tol else 'FAIL'}")
  return 1 if bad else 0


if __name__ == "__main__":
  if len(sys.argv) != 3 or sys.argv[1] not in ("export", "check"):
    sys.exit(__doc__)
  if sys.argv[1] == "export":
    export(sys.argv[2])
  else:
    sys.exit(check(sys.argv[2]))
