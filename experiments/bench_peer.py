"""Benchmark: pdl_jax's jitted PDL train step against a PyTorch peer, same shape, interleaved.

The peer is Hugging Face `LlamaForCausalLM` trained with the loss math of the PDL
authors' trainer.py: shift logits and labels by one, per-token cross-entropy with
ignore_index -100, gather the per-vocabulary weights at the labels, and
sum(w * ce * mask) / sum(w * mask); AdamW and gradient-norm clipping at 1.0.
The jax side is `pdl_jax.models.decoder.Decoder` of the same shape (RMSNorm,
SwiGLU, RoPE, tied embeddings, no unembedding scale: the Hugging Face convention,
not the own model's d_model**-0.5), `pdl_jax.losses.pdl.pdl_loss`, optax AdamW after
clip_by_global_norm(1.0), jitted with donated state. With --window the jax loss
takes the hidden states of the target span only (`pdl_jax.losses.window`) before the
unembedding; the peer always computes logits at every position, as the authors'
trainer does.

jax and torch live in separate virtual environments, so the driver (this file,
stdlib only) starts one worker process per side, each with its own interpreter,
and hands out steps one at a time over pipes: only one worker computes at any
moment (the pipe is the lock) and the steps alternate jax, torch, jax, torch...,
so background load on a shared machine hits both alike. Each worker compiles /
warms up first; the driver reports the median step time of each, tokens/s
(batch * seq_len / median) and the ratio.

A torch venv for the peer (torch is several GB; it is not a project requirement):

    python -m venv /path/to/hfvenv
    /path/to/hfvenv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch
    /path/to/hfvenv/bin/pip install transformers

Runs (the `small` preset shape, then a pretrained-like one, then SmolLM2-135M's
shape with --pretrained=smollm2-135m-instruct; one thread each side,
which is like for like and robust to other load on a shared machine: torch's
default OpenMP threads degrade badly when another process holds a core):

    python experiments/bench_peer.py --jax_python /work/venv/bin/python \\
        --torch_python /work/hfvenv/bin/python --torch_threads 1 --jax_threads 1 --window
    python experiments/bench_peer.py --jax_python /work/venv/bin/python \\
        --torch_python /work/hfvenv/bin/python --torch_threads 1 --jax_threads 1 \\
        --d_model 512 --num_layers 8 --num_heads 8 --mlp_dim 1376 --vocab 32000 \\
        --batch 8 --steps 5 --window

Measured 2026-11-27 on the shared 2-core CPU (another process using about one core),
jax 0.10.2 vs torch 2.13 / transformers 5.24, one thread each, tokens/s, medians:

    shape                      jax+window  jax (before)  torch   jax/torch
    small, V 4000, 32 x 128        3466        2324       2779     1.25
    d512 8L, V 32000, 8 x 128       455         312        183     2.49
    d512 8L, V 128000, 8 x 128      182          89         83     2.19

(small without the window: jax 2888, before 2439, torch 2785: 1.04x, decoder
changes alone 1.18x.) "before" is the decoder of
commit 87890bb via --baseline_root, logits at every position.

--pretrained of another family (Gemma 3: --pretrained=gemma3-270m) builds that model on
both sides from its config.json, random weights: the project's family config
(pdl_jax.models.hf.families.read_config: sliding windows, q/k norms, four norms a
layer) against transformers' own class (AutoModelForCausalLM.from_config), the same
PDL loss on each; the shape flags are ignored then but for batch and seq_len. Gemma 3
270M, batch 2 x 128, one thread each (2026-12-06, docs/pretrained.md): 6.95 s/step
with --window against 13.13 (1.89x), 11.09 without against 13.50 (1.22x).

--baseline_root DIR adds a third worker: the jax step with the pdl_jax package of
another source tree (e.g. `git archive <commit> | tar -x -C DIR`), always with logits at
every position, to compare two versions under the same interleaving.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------
# Shared: the batch (numpy only, so both workers build the same one).
# ---------------------------------------------------------------------------


def make_batch(seed: int, batch: int, seq_len: int, vocab: int, target_frac: float):
  """Prefix-LM batch: tokens [B, L+1]; loss on one contiguous span per row.

  Each row's span (target tokens + EOS) covers about target_frac of the positions,
  at a random place after a prompt of random length, like `pdl_jax.data.batches.make_batch`.
  Returns (tokens_Bx(L+1), mask_BxL) with mask_BxL[b, j] = 1 when the label
  tokens[b, j + 1] is a target.
  """
  import numpy as np
  r = np.random.default_rng(seed)
  tokens = r.integers(3, vocab, (batch, seq_len + 1)).astype(np.int32)
  mask = np.zeros((batch, seq_len), np.float32)
  mean_span = max(1, int(round(target_frac * seq_len)))
  for b in range(batch):
    span = int(np.clip(r.integers(mean_span // 2, mean_span * 3 // 2 + 1), 1, seq_len - 1))
    start = int(r.integers(1, seq_len - span + 1))
    mask[b, start:start + span] = 1.0
  return tokens, mask


def power_weights(vocab: int, alpha: float = 0.5):
  """PDL weights of a Zipf corpus, normalised to mean 1 (float32 [V])."""
  import numpy as np
  counts = np.floor(1e6 / np.arange(1, vocab + 1))
  w = 1.0 / (counts / counts.sum() + 1.0 / counts.sum()) ** alpha
  return (w / w.mean()).astype(np.float32)


def capacity_of(args) -> int:
  """Window capacity: the longest span make_batch can draw (what max_target_len + 1
  would be), rounded up to a multiple of 8, capped at seq_len."""
  mean_span = max(1, int(round(args.target_frac * args.seq_len)))
  longest = min(mean_span * 3 // 2, args.seq_len - 1)
  return min(args.seq_len, -(-longest // 8) * 8)


# ---------------------------------------------------------------------------
# Workers.
# ---------------------------------------------------------------------------


def jax_worker(args):
  """Builds the jitted step; returns step(i) -> None (blocks until done)."""
  if args.jax_threads == 1:
    # XLA:CPU has no thread-count knob but this one: run every op on the caller's
    # thread (its Eigen pool and intra-op parallelism off).
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_cpu_multi_thread_eigen=false"
                               + " intra_op_parallelism_threads=1")
  import jax
  import jax.numpy as jnp
  import optax
  from pdl_jax.losses import pdl
  from pdl_jax.models import decoder
  from pdl_jax.models import config as model_config

  if args.hf_folder:  # another family: the project's config of the model's config.json
    from pdl_jax.models.hf import families as hf_families
    cfg = hf_families.read_config(args.hf_folder)
  else:
    cfg = model_config.DecoderConfig(
        vocab_size=args.vocab, d_model=args.d_model, num_layers=args.num_layers,
        num_heads=args.num_heads, num_kv_heads=args.num_kv_heads, head_dim=args.head_dim,
        mlp_dim=args.mlp_dim, max_len=max(2048, args.seq_len), norm="rms", norm_eps=1e-6,
        tied_embeddings=True, unembed_scale=None)
  model = decoder.Decoder(cfg)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(args.lr, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
  params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
  params = jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, params,
                        is_leaf=lambda x: hasattr(x, "unbox"))
  # The decoder's N(0, 1) embedding suits the own model's d**-0.5 unembedding scale;
  # without it, use Hugging Face Llama's N(0, 0.02) so the loss starts near log V
  # (the timing does not depend on it).
  params["embed"]["embedding"] = params["embed"]["embedding"] * 0.02
  state = (params, tx.init(params))
  weights_V = jnp.asarray(power_weights(args.vocab))
  use_window = args.window
  capacity = capacity_of(args)
  if use_window:
    from pdl_jax.losses import window

  def loss_fn(params, inputs_BxL, labels_BxL, mask_BxL):
    if not use_window:
      logits_BxLxV, _ = model.apply({"params": params}, inputs_BxL)
      return pdl.pdl_loss(logits_BxLxV, labels_BxL, weights_V, mask=mask_BxL)
    hidden_BxLxD, _ = model.apply({"params": params}, inputs_BxL, return_hidden=True)
    hidden_BxCxD, labels_BxC, mask_BxC = window.gather_window(
        hidden_BxLxD, labels_BxL, mask_BxL, capacity)
    logits_BxCxV = model.apply({"params": params}, hidden_BxCxD,
                               method=decoder.Decoder.unembed_logits)
    return pdl.pdl_loss(logits_BxCxV, labels_BxC, weights_V, mask=mask_BxC)

  def train_step(state, inputs_BxL, labels_BxL, mask_BxL):
    params, opt_state = state
    loss, grads = jax.value_and_grad(loss_fn)(params, inputs_BxL, labels_BxL, mask_BxL)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), loss

  step_fn = jax.jit(train_step, donate_argnums=(0,))
  batches = []
  for i in range(4):
    tokens, mask = make_batch(i, args.batch, args.seq_len, args.vocab, args.target_frac)
    batches.append((jnp.asarray(tokens[:, :-1]), jnp.asarray(tokens[:, 1:]),
                    jnp.asarray(mask)))
  holder = {"state": state}

  def step(i):
    holder["state"], loss = step_fn(holder["state"], *batches[i % 4])
    loss.block_until_ready()
    return float(loss)

  info = f"jax {jax.__version__} {jax.devices()[0].platform}" + (
      f", window capacity {capacity}" if use_window else ", logits at every position")
  return step, info


def torch_worker(args):
  """The peer: LlamaForCausalLM with the authors' trainer.py loss; returns step(i)."""
  import numpy as np
  import torch
  import transformers

  torch.manual_seed(0)
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  if args.hf_folder:  # another family: transformers' own class for the config.json
    config = transformers.AutoConfig.from_pretrained(args.hf_folder)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
  else:
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=args.mlp_dim,
        num_hidden_layers=args.num_layers, num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(2048, args.seq_len), rms_norm_eps=1e-6,
        tie_word_embeddings=True, attention_bias=False, mlp_bias=False)
    model = transformers.LlamaForCausalLM(config)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8,
                          weight_decay=0.01)
  weights_V = torch.from_numpy(power_weights(args.vocab))
  batches = []
  for i in range(4):
    tokens, mask = make_batch(i, args.batch, args.seq_len, args.vocab, args.target_frac)
    # trainer.py's layout: input_ids and labels of the same length, labels = input ids
    # with -100 off the target; the loss shifts them. The model sees L tokens, as the
    # jax side, and its last position is the one the shift drops.
    input_ids = torch.from_numpy(tokens[:, :-1].astype(np.int64))
    labels = torch.full_like(input_ids, -100)
    labels[:, 1:] = torch.where(torch.from_numpy(mask[:, :-1]) > 0, input_ids[:, 1:],
                                torch.tensor(-100))
    batches.append((input_ids, labels))

  def step(i):
    input_ids, labels = batches[i % 4]
    logits = model(input_ids=input_ids).logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = labels[..., 1:].contiguous()
    ce = torch.nn.functional.cross_entropy(
        shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1),
        ignore_index=-100, reduction="none")
    mask = (shift_labels.view(-1) != -100).float()
    w = weights_V[shift_labels.view(-1).clamp(min=0)]
    loss = (w * ce * mask).sum() / (w * mask).sum()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss.detach())

  return step, (f"torch {torch.__version__} transformers {transformers.__version__}, "
                f"{torch.get_num_threads()} threads")


def run_worker(args):
  """Worker loop: build, warm up, print READY; then one step per 'STEP' line."""
  build = jax_worker if args.worker == "jax" else torch_worker
  step, info = build(args)
  for i in range(args.warmup):
    step(i)
  out = sys.stdout
  out.write(json.dumps({"ready": True, "info": info}) + "\n")
  out.flush()
  for i, line in enumerate(sys.stdin):
    if line.strip() != "STEP":
      break
    t0 = time.perf_counter()
    loss = step(i)
    out.write(json.dumps({"seconds": time.perf_counter() - t0, "loss": loss}) + "\n")
    out.flush()


# ---------------------------------------------------------------------------
# Driver.
# ---------------------------------------------------------------------------


SHAPE_FLAGS = ("vocab", "d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim",
               "mlp_dim",
               "batch", "seq_len", "target_frac", "lr", "warmup", "torch_threads",
               "jax_threads")


def start(name: str, python: str, worker: str, args, root: str | None = None):
  cmd = [python, os.path.abspath(__file__), "--worker", worker]
  for flag in SHAPE_FLAGS:
    cmd += [f"--{flag}", str(getattr(args, flag))]
  if args.window and worker == "jax" and not root:  # the baseline is "before": no window
    cmd.append("--window")
  if root:
    cmd += ["--root", root]
  if args.hf_folder:
    cmd += ["--hf_folder", args.hf_folder]
  # The pdl_jax package of `root` (the baseline checkout) first on the worker's path.
  return {"name": name, "proc": spawn(cmd, root), "times": [], "losses": []}


def spawn(cmd: list[str], root: str | None = None) -> subprocess.Popen:
  """A worker process talking over pipes, with the pdl_jax package of `root` (another
  source tree) or of this one first on its path (also used by bench_decode.py)."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root or ROOT, os.environ.get("PYTHONPATH")) if p))
  return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          cwd=root or ROOT, env=env)


def stop(workers) -> None:
  """Asks each worker to quit and waits for it."""
  for w in workers:
    try:
      w["proc"].stdin.write("QUIT\n")
      w["proc"].stdin.close()
    except (BrokenPipeError, OSError):
      pass
    w["proc"].wait(timeout=120)


def read_json(worker) -> dict:
  line = worker["proc"].stdout.readline()
  if not line:
    raise RuntimeError(f"worker {worker['name']} exited (code {worker['proc'].wait()}); "
                       "see its stderr above.")
  return json.loads(line)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--jax_python", default=sys.executable)
  p.add_argument("--torch_python", default=None, help="interpreter with torch + "
                 "transformers; omit to time the jax side only")
  p.add_argument("--baseline_root", default=None,
                 help="a second pdl_jax source tree to time as another jax worker")
  p.add_argument("--steps", type=int, default=10, help="timed steps per worker")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps (compile)")
  p.add_argument("--vocab", type=int, default=4000)
  p.add_argument("--d_model", type=int, default=192)
  p.add_argument("--num_layers", type=int, default=3)
  p.add_argument("--num_heads", type=int, default=3)
  p.add_argument("--num_kv_heads", type=int, default=None, help="default: --num_heads")
  p.add_argument("--head_dim", type=int, default=64)
  p.add_argument("--pretrained", default=None,
                 help="a named model or HF folder: its shape replaces the shape flags")
  p.add_argument("--mlp_dim", type=int, default=512)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--seq_len", type=int, default=128)
  p.add_argument("--target_frac", type=float, default=0.2,
                 help="mean fraction of positions in each row's loss span")
  p.add_argument("--lr", type=float, default=1e-4)
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: torch's default, one per core)")
  p.add_argument("--jax_threads", type=int, default=0, choices=(0, 1),
                 help="1: single-threaded XLA:CPU (0: its default pool, one per core)")
  p.add_argument("--window", action="store_true",
                 help="jax: logits only on the loss span (pdl_jax.losses.window)")
  p.add_argument("--worker", choices=("jax", "torch"), default=None, help=argparse.SUPPRESS)
  p.add_argument("--root", default=None, help=argparse.SUPPRESS)
  p.add_argument("--hf_folder", default=None, help=argparse.SUPPRESS)
  p.add_argument("--skip_jax", action="store_true",
                 help="time the torch side only (one side at a time where memory is short: "
                 "Gemma 3 270M with AdamW holds ~5 GB a side)")
  args = p.parse_args()
  if args.num_kv_heads is None:
    args.num_kv_heads = args.num_heads
  if args.worker:
    run_worker(args)
    return
  if args.pretrained:  # the real model's shape (random weights: timing only)
    from pdl_jax.models.hf import families as hf_families
    from pdl_jax.models.hf import locate
    folder = locate.local_dir(args.pretrained)
    cfg = hf_families.read_config(folder)
    if cfg.model_type != "llama":
      # Both sides build the model of its config.json (random weights): the project's
      # family (Gemma 3: sliding windows, q/k norms, four norms a layer) against
      # transformers' own class for it.
      args.hf_folder = os.path.abspath(folder)
    elif not (cfg.tied_embeddings and cfg.norm == "rms" and cfg.mlp == "gated"):
      raise SystemExit(f"--pretrained={args.pretrained}: the peer is a tied Llama; "
                       f"{cfg.model_type} is not that shape.")
    args.vocab, args.d_model, args.num_layers = cfg.vocab_size, cfg.d_model, cfg.num_layers
    args.num_heads, args.num_kv_heads = cfg.num_heads, cfg.num_kv_heads
    args.head_dim, args.mlp_dim = cfg.head_dim, cfg.mlp_dim

  workers = [] if args.skip_jax else [start("jax", args.jax_python, "jax", args)]
  if args.baseline_root:
    workers.append(start("jax_baseline", args.jax_python, "jax", args,
                         os.path.abspath(args.baseline_root)))
  if args.torch_python:
    workers.append(start("torch", args.torch_python, "torch", args))
  try:
    # Workers build and compile concurrently; timing starts once all are ready.
    infos = {w["name"]: read_json(w)["info"] for w in workers}
    for _ in range(args.steps):
      for w in workers:
        w["proc"].stdin.write("STEP\n")
        w["proc"].stdin.flush()
        reply = read_json(w)
        w["times"].append(reply["seconds"])
        w["losses"].append(reply["loss"])
  finally:
    stop(workers)

  tokens = args.batch * args.seq_len
  print(f"shape{f' of {args.pretrained}' if args.pretrained else ''}: d_model {args.d_model}, "
        f"{args.num_layers} layers, {args.num_heads} heads ({args.num_kv_heads} KV) x "
        f"{args.head_dim}, mlp {args.mlp_dim}, vocab {args.vocab}, tied; batch {args.batch} x "
        f"{args.seq_len} = {tokens} tokens, loss span ~{args.target_frac:.0%} of positions; "
        f"median of {args.steps} interleaved steps after {args.warmup} warm-up")
  tps = {}
  for w in workers:
    med = statistics.median(w["times"])
    tps[w["name"]] = tokens / med
    print(f"{w['name']:>13}: {med * 1e3:8.1f} ms/step {tps[w['name']]:9.0f} tokens/s "
          f"(min {min(w['times']) * 1e3:.1f} ms; last loss {w['losses'][-1]:.4f}) "
          f"[{infos[w['name']]}]")
  if "torch" in tps and "jax" in tps:
    print(f"jax / torch = {tps['jax'] / tps['torch']:.2f}")
  if "jax_baseline" in tps:
    print(f"jax / jax_baseline = {tps['jax'] / tps['jax_baseline']:.2f}")


if __name__ == "__main__":
  main()
