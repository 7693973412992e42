"""Evaluation on a fixed validation subset: the run's own loss and the plain token NLL
(same loss function as training), the unigram bar, decoding and generation metrics,
and sample generations written to WORKDIR/samples."""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable

import jax
import numpy as np

from pdl_jax.data import batches as batches_lib
from pdl_jax.data import examples as examples_lib
from pdl_jax.eval import decode as decode_lib
from pdl_jax.eval import informativeness
from pdl_jax.eval import metrics as metrics_lib
from pdl_jax.eval import progress
from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax.losses import logit_adjustment
from pdl_jax.losses import pdl


def eval_sums(params, loss_state_V, batch, weights_V, *, loss_fn, reduction: str):
  """Sums over a batch that add up across batches: target tokens, their NLL, and the
  numerator and denominator of the run's loss (loss_fn(params, batch, weights_V,
  loss_state_V) -> (loss, (LossAux, _)), the function training uses; its
  denominator is the weight sum or the token count, by `reduction`)."""
  loss, (aux, _) = loss_fn(params, batch, weights_V, loss_state_V)
  den = pdl.loss_denominator(aux, reduction)
  return {"tokens": aux.num_tokens, "nll_sum": aux.nll * aux.num_tokens,
          "loss_num": loss * den, "loss_den": den}


def unigram_nll(examples: examples_lib.Examples, counts_V: np.ndarray,
                num_tokens: int | None = None) -> float:
  """NLL (nats/token) of the examples' loss tokens under the add-one smoothed train
  unigram distribution over the tokenizer's `num_tokens` ids: the bar a model must
  clear to have learned more than frequencies."""
  ids = examples.seqs[examples.loss_positions()]
  log_probs = metrics_lib.add_one_log_probs(counts_V, num_tokens)
  return float(-log_probs[ids].mean()) if ids.size else 0.0


def prompt_ids(examples: examples_lib.Examples) -> list[list[int]]:
  """Each example's prompt as training lays it out (up to its target): what
  evaluation decodes from."""
  return [examples.seqs[i, :examples.target_start[i]].tolist()
          for i in range(len(examples))]


def stop_and_banned_ids(tokenizer, model_vocab_size: int
                        ) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """(ids that end a generation, ids never generated) for evaluation's decoding.

  Every id that ends a generation, the EOS first: decoding stops on any of them.
  Banned: the control ids, and a pretrained embedding's rows past its tokenizer (no
  text has them)."""
  eos_ids = (tokenizer.eos_id,) + tuple(
      i for i in tokenizer.eos_ids if i != tokenizer.eos_id)
  padding_rows = range(tokenizer.vocab_size, model_vocab_size)
  banned = tuple(sorted({tokenizer.pad_id, tokenizer.bos_id, tokenizer.sep_id,
                         tokenizer.unk_id, *padding_rows} - {*eos_ids, -1}))
  return eos_ids, banned


def decode_batches(lengths: list[int], batch_size: int, length_bucket: int
                   ) -> list[tuple[list[int], int]]:
  """How generate_all batches prompts of these lengths: (indices, padded length) per
  batch. With length_bucket > 0, in order of length (stable), each batch left-padded
  to its longest prompt rounded up to a multiple of length_bucket (at most the
  longest prompt): fewer padded positions to prefill and to attend to at every
  step, and few distinct shapes (each is a compiled decoder, compiled once per run).
  With 0, in the given order, every batch padded to the longest prompt (one shape)."""
  longest = max(lengths, default=1)
  order = (sorted(range(len(lengths)), key=lengths.__getitem__) if length_bucket > 0
           else list(range(len(lengths))))
  out = []
  for start in range(0, len(order), batch_size):
    idx = order[start:start + batch_size]
    size = longest
    if length_bucket > 0:
      size = min(longest, -(-max(lengths[i] for i in idx) // length_bucket) * length_bucket)
    out.append((idx, size))
  return out


def generate_all(model, params, prompts: list[list[int]], mesh, rng, *, method: str,
                 batch_size: int, length_bucket: int, max_new_tokens: int,
                 eos_ids: tuple[int, ...], pad_id: int, banned_ids: tuple[int, ...],
                 beam_size: int = 4, top_p: float = 0.9, temperature: float = 1.0,
                 bias_V: np.ndarray | None = None,
                 progress: Callable[[int], None] | None = None) -> list[list[int]]:
  """Generated ids (cut at the first EOS, no padding) for every prompt, in the
  prompts' order, decoded in the batches of decode_batches (the last one filled with
  copies of its last prompt). Top-p's draws for prompt k come from
  fold_in(rng, k) (pdl_jax.eval.decode.generate's row_ids_B): the same whatever the
  batching, batch size or padded length. bias_V: [V] added to the logits before each
  choice (logit-adjusted decoding); None: plain decoding. progress: called with the
  number of prompts decoded so far after each batch."""
  hyp_ids: list[list[int] | None] = [None] * len(prompts)
  done = 0
  if bias_V is not None:
    bias_V = multihost.replicate(mesh, np.asarray(bias_V, np.float32))
  for idx, size in decode_batches([len(p) for p in prompts], batch_size, length_bucket):
    rows = idx + [idx[-1]] * (batch_size - len(idx))
    tokens, mask = decode_lib.left_pad([prompts[i] for i in rows], size, pad_id)
    tokens, mask, row_ids = multihost.replicate(mesh, (tokens, mask,
                                                   np.asarray(rows, np.int32)))
    out = decode_lib.decode(model, params, tokens, mask, rng, method=method,
                            max_new_tokens=max_new_tokens, eos_id=eos_ids, pad_id=pad_id,
                            beam_size=beam_size, top_p=top_p, temperature=temperature,
                            banned_ids=banned_ids, row_ids_B=row_ids, bias_V=bias_V)
    for i, ids in zip(idx, decode_lib.strip_after_eos(multihost.to_host(out), eos_ids, pad_id)):
      hyp_ids[i] = ids
    done += len(idx)
    if progress is not None:
      progress(done)
  return hyp_ids


def text_measures(hyps: list[str], refs: list[str], prompts: list[str]) -> dict[str, float]:
  """The informativeness measures that need no counts (eval/informativeness.py): the
  share of the references' content words an output recalls and of its own that are in
  the reference, outputs that loop or copy a 4-gram of the prompt, repeated
  trigrams. (NIDF needs the task's word statistics: experiments/report.py --measures.)"""
  sums = informativeness.per_example(hyps, refs, prompts, stats=None)
  return {name: informativeness.ratio(*sums[name])
          for name in ("content_recall", "content_precision", "loop", "prompt_copy", "rep_3")}


# What a run evaluates: the validation prompts its results report, or the "tune" split
# (config.dataset.tune_examples held out of the train split as whole groups), on which a
# setting such as the learning rate is chosen without looking at them.
SPLITS = ("validation", "tune")


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What the evaluator needs of a run's settings."""

  eval: Any  # config.eval: decodings, batch size, lengths, sampling, samples kept
  generate: bool  # the task has generations to score (not pretraining)
  final_step: int  # the run's last step: its generations are all kept
  seed: int  # the run's seed (decoding samples with seed + 1)
  reduction: str  # the loss's reduction (registry.resolve_reduction)
  # How logit-adjusted decodings ("greedy_bias0.25") make their bias from the counts:
  # config.loss's frequency and epsilon, as the run's PDL weights would.
  bias_frequency: str = "relative"
  bias_epsilon: float | None = None


class Evaluator:
  """Eval loss and generation metrics on a fixed validation subset.

  Logged keys: eval/loss (the run's own objective: the PDL loss for PDL runs, the
  token cross-entropy for CE runs), eval/nll (plain token NLL: the number that
  compares across losses and alphas), eval/unigram_nll, and for tasks with
  generation the metrics of pdl_jax.eval.metrics on the outputs of config.eval.decode
  (greedy by default) under eval/<metric>, and of each of config.eval.extra_decodes
  (nucleus sampling, top-p, with a fixed seed by default) under eval/<method>/<metric>.
  A decoding named <method>_bias<beta> (e.g. greedy_bias0.25) adds
  -beta * log(freq + eps) to the logits before each choice, freq and eps from the
  run's token stats as its PDL weights would be (losses/logit_adjustment.py): beta =
  alpha is PDL's population optimum, decoded from this model.
  """

  def __init__(self, settings: EvalSettings, workdir: str, model, tokenizer,
               examples: examples_lib.Examples, counts_V: np.ndarray, weights_V, mesh,
               state_shardings, loss_fn):
    """state_shardings: the train state's (the model's params are
    state.model_params(): with LoRA the frozen base and the adapters together)."""
    self.settings, self.workdir, self.model, self.tok = settings, workdir, model, tokenizer
    self.examples, self.counts_V, self.weights_V = examples, counts_V, weights_V
    self.mesh = mesh
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.sums_fn = jax.jit(
        functools.partial(eval_sums, loss_fn=loss_fn, reduction=settings.reduction),
        in_shardings=(state_shardings.model_params(), state_shardings.loss_state, rep, rep),
        out_shardings=rep)
    self.prompts = prompt_ids(examples)
    # The references' ids as training lays them out (a plain-format HF tokenizer
    # encodes them after the prompt and separator, not alone: Metaspace's '▁').
    self.ref_ids = (tokenizer.encode_parts(examples.prompts, examples.targets)[2]
                    if hasattr(tokenizer, "encode_parts")
                    else tokenizer.encode_batch(examples.targets))
    self.unigram_nll = unigram_nll(examples, counts_V, tokenizer.vocab_size)
    self.eos_ids, self.banned = stop_and_banned_ids(tokenizer, model.cfg.vocab_size)

  def __call__(self, state, step: int) -> dict[str, float]:
    c = self.settings
    params = state.model_params()
    sums = None
    for batch in batches_lib.eval_batches(self.examples, c.eval.batch_size):
      out = self.sums_fn(params, state.loss_state, multihost.replicate(self.mesh, {
          k: v for k, v in batch.items() if k != "example_mask"}), self.weights_V)
      out = jax.tree.map(lambda x: multihost.to_host(x).astype(np.float64), out)
      sums = out if sums is None else jax.tree.map(np.add, sums, out)
    result = {"eval/loss": float(sums["loss_num"] / max(sums["loss_den"], 1e-30)),
              "eval/nll": float(sums["nll_sum"] / max(sums["tokens"], 1)),
              "eval/unigram_nll": self.unigram_nll}
    if not c.generate:
      return result
    for i, method in enumerate((c.eval.decode, *c.eval.extra_decodes)):
      if i > 0 and step != c.final_step and decode_lib.parse_method(method)[1] is not None:
        # A logit-adjusted decode is the control of the trained model: the base model
        # (step 0) or a mid-run model with the bias is no point of the comparison, and
        # its decodes would double the time of every eval.
        continue
      n = num_prompts(c.eval, method, len(self.prompts))
      hyps, hyp_ids = self._generate(params, method, step, n)
      targets, prompts = self.examples.targets[:n], self.examples.prompts[:n]
      gen = metrics_lib.generation_metrics(hyps, targets, hyp_ids, self.ref_ids[:n],
                                           self.counts_V)
      gen.update(text_measures(hyps, targets, prompts))
      # Share of tokens per train-frequency decile (0 = most frequent), for the plots
      # of what each loss generates against the references.
      for prefix, ids in (("freq_bucket", hyp_ids), ("ref_freq_bucket", self.ref_ids[:n])):
        for k, share in enumerate(metrics_lib.frequency_buckets(ids, self.counts_V)):
          gen[f"{prefix}_{k}"] = share
      scope = "eval/" if i == 0 else f"eval/{method}/"
      # The references' buckets once, and again for a decoding of fewer prompts (the
      # references of its own prompts: report.profile_tv compares with those).
      result.update({f"{scope}{k}": float(v) for k, v in gen.items()
                     if i == 0 or n < len(self.prompts) or not k.startswith("ref_")})
      self._write_samples(step, hyps, "" if i == 0 else f"{method}_")
      if step in (0, c.final_step):
        self._write_all(step, method, hyps, hyp_ids)
    return result

  def bias(self, beta: float | None) -> np.ndarray | None:
    """The logit bias of strength beta over the model's vocabulary (None: none)."""
    if beta is None:
      return None
    c = self.settings
    return logit_adjustment.frequency_bias(
        self.counts_V, beta, c.bias_epsilon, frequency=c.bias_frequency,
        vocab_size=self.model.cfg.vocab_size)

  def _generate(self, params, name: str, step: int, n: int
                ) -> tuple[list[str], list[list[int]]]:
    """The generations of decoding `name` for the first n evaluation prompts."""
    c = self.settings
    method, beta = decode_lib.parse_method(name)
    meter = progress.Progress(f"eval at step {step}: {name}", n, multihost.log)
    hyp_ids = generate_all(
        self.model, params, self.prompts[:n], self.mesh, jax.random.key(c.seed + 1),
        bias_V=self.bias(beta), method=method, batch_size=c.eval.batch_size,
        length_bucket=c.eval.length_bucket, max_new_tokens=c.eval.max_new_tokens,
        eos_ids=self.eos_ids, pad_id=self.tok.pad_id, banned_ids=self.banned,
        beam_size=c.eval.beam_size, top_p=c.eval.top_p, temperature=c.eval.temperature,
        progress=meter)
    return self.tok.decode_batch(hyp_ids), hyp_ids

  def _write_all(self, step: int, method: str, hyps: list[str],
                 hyp_ids: list[list[int]]) -> None:
    """Every generation of the base model's eval (step 0: samples/base_<method>.jsonl)
    and of the final one (samples/final_<method>.jsonl), one line per evaluation
    prompt in order, so anyone can re-score them (experiments/report.py computes
    per-example metrics and paired bootstrap intervals from them). Each line holds the
    texts, the generation's token ids and how many of them are rare (outside the
    frequent head that holds half the train token mass: what eval/rare_token_share
    counts)."""
    if jax.process_index() != 0:
      return
    frequent_V = metrics_lib.frequent_head(self.counts_V)
    rare = lambda ids: int(sum(not frequent_V[i] for i in ids if 0 <= i < len(frequent_V)))
    lines = [json.dumps({"index": k, "input": p, "reference": r, "generation": h,
                         "generation_ids": [i for i in ids if 0 <= i < len(frequent_V)],
                         "rare_tokens": rare(ids)})
             for k, (p, r, h, ids) in enumerate(zip(self.examples.prompts,
                                                    self.examples.targets, hyps, hyp_ids))]
    name = "base" if step == 0 else "final"
    paths.atomic_write_text(paths.path(self.workdir) / "samples" / f"{name}_{method}.jsonl",
                            "\n".join(lines) + "\n")

  def _write_samples(self, step: int, hyps: list[str], prefix: str = "") -> None:
    if jax.process_index() != 0:
      return
    lines = [json.dumps({"input": p, "reference": r, "generation": h})
             for p, r, h in zip(self.examples.prompts, self.examples.targets,
                                hyps[:self.settings.eval.num_samples])]
    paths.atomic_write_text(
        paths.path(self.workdir) / "samples" / f"{prefix}step_{step:07d}.jsonl",
                            "\n".join(lines) + "\n")


def num_prompts(e: Any, method: str, available: int) -> int:
  """How many of the `available` evaluation prompts decoding `method` generates for:
  all, or for a sampled one (top_p, top_p_bias...) at most eval.sampled_examples
  (the first ones: a prompt's draws are keyed by the prompt, so they are the draws
  of a run over those prompts alone)."""
  limit = e.get("sampled_examples")
  if limit is None or decode_lib.parse_method(method)[0] != "top_p":
    return available
  return min(limit, available)


def check(e) -> None:
  """The eval settings (config.eval): raises ValueError naming the bad key."""
  limit = e.get("sampled_examples")
  if limit is not None and not (isinstance(limit, int) and not isinstance(limit, bool)
                                and limit >= 1):
    raise ValueError(f"config.eval.sampled_examples={limit!r}; expected an integer >= 1 "
                     "or None (every evaluation prompt).")
  split = e.get("split", "validation")
  if split not in SPLITS:
    raise ValueError(f"config.eval.split={split!r}; expected one of {SPLITS}.")
  names = (e.decode, *e.extra_decodes)
  for method in names:
    try:
      canonical = decode_lib.method_name(*decode_lib.parse_method(method))
    except ValueError as err:
      raise ValueError(f"config.eval decode method {method!r} (eval.decode / "
                       f"eval.extra_decodes): {err}") from None
    if canonical != method:  # metric keys and sample files are named by it: one spelling
      raise ValueError(f"config.eval decode method {method!r}: write it as {canonical!r} "
                       "(the name its metrics, samples and report points are found by).")
  twice = sorted({m for m in names if names.count(m) > 1})
  if twice:
    raise ValueError(f"config.eval decodes {twice} appear twice in eval.decode / "
                     "eval.extra_decodes; their metrics and samples would collide.")
  bucket = e.length_bucket
  if not (isinstance(bucket, int) and not isinstance(bucket, bool) and bucket >= 0):
    raise ValueError(f"config.eval.length_bucket={bucket!r}; expected an integer >= 0 "
                     "(0: decode prompts in order, all padded to the longest).")
