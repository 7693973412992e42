"""Benchmark: greedy and top-p decoding of a pretrained model, against transformers' generate.

Each side decodes the same random prompts (batch B, P tokens each, no padding) for
exactly T new tokens (no EOS stop, so both do the same work) and the driver prints
tokens/s = B * T / median wall time, prefill included, for greedy and for top-p
(p = 0.9), and the per-token time after the prefill ((greedy T - greedy 1) / (T - 1)).

The jax side is `pdl_jax.eval.decode.decode` on the model loaded by
`pdl_jax.models.hf.weights.load` (float32). With --torch_python, the peer is
transformers' `AutoModelForCausalLM.generate` on the same Hugging Face folder,
float32, `do_sample=False` and `do_sample=True, top_p=0.9, top_k=0`, with its KV
cache. With --baseline_root, a second jax worker runs the decoder of another source
tree (e.g. `git archive <commit> | tar -x -C DIR`): today's code against an older one
under the same interleaving.

As in bench_peer.py, each side is its own process (its own interpreter and venv)
and the driver hands out one decode at a time over pipes, alternating sides, so
background load on a shared machine hits both alike. The torch venv:

    python -m venv /path/to/hfvenv
    /path/to/hfvenv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
    /path/to/hfvenv/bin/pip install transformers

    python experiments/bench_decode.py --pretrained=smollm2-135m-instruct \\
        --batch_size=64 --prompt_len=96 --new_tokens=48 \\
        --torch_python /path/to/hfvenv/bin/python [--baseline_root /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from experiments import bench_peer  # the worker plumbing (stdlib only)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("greedy", "top_p", "prefill")  # prefill: greedy with one new token


def prompts(args, vocab: int):
  """The same [B, P] int32 prompt ids on every side (numpy only)."""
  import numpy as np
  r = np.random.default_rng(0)
  return r.integers(100, min(vocab, 40000), (args.batch_size, args.prompt_len)).astype(
      np.int32)


def jax_worker(args):
  """Returns decode(method) -> None (blocks until the tokens are on the host)."""
  import jax
  import numpy as np
  from pdl_jax.eval import decode as decode_lib
  from pdl_jax.models.hf import locate
  from pdl_jax.models.hf import weights as hf_weights

  model_dir = locate.local_dir(args.pretrained)
  model, params = hf_weights.load(model_dir)
  tokens = prompts(args, model.cfg.vocab_size)
  mask = np.ones_like(tokens)
  rng = jax.random.key(0)

  def run(method):
    new = 1 if method == "prefill" else args.new_tokens
    out = decode_lib.decode(model, params, tokens, mask, rng,
                            method="greedy" if method == "prefill" else method,
                            max_new_tokens=new, eos_id=-1, pad_id=-2, top_p=0.9)
    return np.asarray(out)

  return run, f"jax {jax.__version__} {jax.devices()[0].platform}"


def torch_worker(args):
  """The peer: transformers' generate on the same Hugging Face folder."""
  import numpy as np
  import torch
  import transformers

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  model_dir = args.model_dir
  model = transformers.AutoModelForCausalLM.from_pretrained(model_dir,
                                                            dtype=torch.float32)
  model.eval()
  ids = torch.from_numpy(prompts(args, model.config.vocab_size).astype(np.int64))
  mask = torch.ones_like(ids)
  torch.manual_seed(0)

  def run(method):
    new = 1 if method == "prefill" else args.new_tokens
    sample = dict(do_sample=True, top_p=0.9, top_k=0) if method == "top_p" else dict(
        do_sample=False)
    with torch.inference_mode():
      out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new,
                           min_new_tokens=new, pad_token_id=0, use_cache=True, **sample)
    return out[:, ids.shape[1]:].numpy()  # generate returns prompt + new tokens

  return run, (f"torch {torch.__version__} transformers {transformers.__version__}, "
               f"{torch.get_num_threads()} threads")


def run_worker(args):
  """Worker loop: build, warm up every method, print READY; then one decode per line."""
  build = jax_worker if args.worker == "jax" else torch_worker
  run, info = build(args)
  for method in METHODS:
    shape = run(method).shape
  out = sys.stdout
  out.write(json.dumps({"ready": True, "info": info, "shape": list(shape)}) + "\n")
  out.flush()
  for line in sys.stdin:
    method = line.strip()
    if method not in METHODS:
      break
    t0 = time.perf_counter()
    tokens = run(method)
    out.write(json.dumps({"seconds": time.perf_counter() - t0,
                          "new": int(tokens.shape[1])}) + "\n")
    out.flush()


def start(name, python, worker, args, root=None):
  cmd = [python, os.path.abspath(__file__), "--worker", worker,
         "--pretrained", args.pretrained, "--model_dir", args.model_dir,
         "--batch_size", str(args.batch_size), "--prompt_len", str(args.prompt_len),
         "--new_tokens", str(args.new_tokens), "--torch_threads", str(args.torch_threads)]
  return {"name": name, "proc": bench_peer.spawn(cmd, root),
          "times": {m: [] for m in METHODS}}


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--pretrained", default="smollm2-135m-instruct",
                 help="a named model (pdl_jax.models.hf.offline) or a Hugging Face folder")
  p.add_argument("--batch_size", type=int, default=64)
  p.add_argument("--prompt_len", type=int, default=96)
  p.add_argument("--new_tokens", type=int, default=48)
  p.add_argument("--repeats", type=int, default=5, help="timed decodes per method and side")
  p.add_argument("--torch_python", default=None,
                 help="interpreter with torch + transformers; omit for jax only")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: torch's default, one per core)")
  p.add_argument("--baseline_root", default=None,
                 help="another pdl_jax source tree, timed as a second jax worker")
  p.add_argument("--worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--model_dir", default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.new_tokens < 2:
    p.error(f"--new_tokens must be at least 2 (got {args.new_tokens}): the per-token "
            "time is (T tokens - 1 token) / (T - 1).")
  if args.worker:
    run_worker(args)
    return
  from pdl_jax.models.hf import locate
  args.model_dir = locate.local_dir(args.pretrained)

  workers = [start("jax", sys.executable, "jax", args)]
  if args.baseline_root:
    workers.append(start("jax_baseline", sys.executable, "jax", args,
                         os.path.abspath(args.baseline_root)))
  if args.torch_python:
    workers.append(start("torch", args.torch_python, "torch", args))
  try:
    infos = {w["name"]: bench_peer.read_json(w)["info"] for w in workers}
    for _ in range(args.repeats):
      for method in METHODS:
        for w in workers:
          w["proc"].stdin.write(method + "\n")
          w["proc"].stdin.flush()
          reply = bench_peer.read_json(w)
          want = 1 if method == "prefill" else args.new_tokens
          if reply["new"] != want:
            raise RuntimeError(f"{w['name']} {method} returned {reply['new']} new tokens; "
                               f"expected {want}")
          w["times"][method].append(reply["seconds"])
  finally:
    bench_peer.stop(workers)

  b, t = args.batch_size, args.new_tokens
  print(f"model {args.pretrained}; batch {b}, prompt {args.prompt_len}, {t} new tokens; "
        f"median of {args.repeats} interleaved decodes per method")
  tps = {}
  for w in workers:
    med = {m: statistics.median(v) for m, v in w["times"].items()}
    tps[w["name"]] = {m: b * t / med[m] for m in ("greedy", "top_p")}
    per_token = (med["greedy"] - med["prefill"]) / (t - 1)
    print(f"{w['name']:>12}: greedy {tps[w['name']]['greedy']:8.1f} tokens/s  top_p "
          f"{tps[w['name']]['top_p']:8.1f} tokens/s  prefill {med['prefill']:.2f} s  "
          f"per token {per_token * 1e3:.1f} ms  [{infos[w['name']]}]")
  for other in ("torch", "jax_baseline"):
    if other in tps:
      print(f"jax / {other}: greedy {tps['jax']['greedy'] / tps[other]['greedy']:.2f}  "
            f"top_p {tps['jax']['top_p'] / tps[other]['top_p']:.2f}")


if __name__ == "__main__":
  main()
