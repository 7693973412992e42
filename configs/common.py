"""Shared config defaults and the `file.py:key=value,...` argument parser.

Task configs (summarization.py, dialogue.py, style_transfer.py, pretrain.py) call
`get_base_config(task)` and change what differs.
"""

from __future__ import annotations

import difflib
import importlib.util
import os

import ml_collections

# The losses PDL is compared with in the task sweeps (pdl_jax/losses/baselines.py).
BASELINES = ("itf", "face", "tlat_exp", "tlat_chi2", "unlikelihood", "focal",
             "label_smoothing")
# The model-weighted SFT losses since 2024 (pdl_jax/losses/self_weighted.py): the
# real-model comparison runs them in every task.
RECENT_BASELINES = ("dft", "gem", "mile")
# PDL's free control: the CE runs' logit-adjusted decodes (beta = PDL's alpha is its
# population optimum; docs/losses.md), greedy at four strengths and top-p at two.
CE_CONTROL_DECODES = ("greedy_bias0.1", "greedy_bias0.25", "greedy_bias0.5", "greedy_bias1",
                      "top_p_bias0.25", "top_p_bias0.5")

# Words a `get_config(arg)` string may hold besides key=value items.
ARG_WORDS = ["smoke", "quick", "long", "tune"]
# Values a `get_config(arg)` string may set, with the config path each one sets.
ARG_KEYS = {
    "loss": "loss.name", "alpha": "loss.alpha", "epsilon": "loss.epsilon",
    "dataset": "dataset.name", "model": "model.preset", "steps": "num_steps",
    "seed": "seed", "batch_size": "batch_size", "init_from": "init_from",
    "chunked": "loss.chunked", "decode": "eval.decode", "pretrained": "model.pretrained",
    "reduction": "loss.reduction", "eos_weight": "loss.eos_weight",
    "lr": "optimizer.learning_rate",
}


def get_loss_config() -> ml_collections.ConfigDict:
  """The loss section: which loss, and how PDL weights are made from counts."""
  c = ml_collections.ConfigDict()
  c.name = "pdl"  # "ce", "pdl", or a baseline: itf, face, tlat_exp, tlat_chi2, unlikelihood, focal, label_smoothing, dft, gem, mile.
  c.alpha = 0.5  # Decay exponent of w(t) = 1 / (freq(t) + eps) ** alpha; 0 = CE.
  c.epsilon = ml_collections.FieldReference(None, field_type=float)  # None: add-one smoothing.
  c.frequency = "relative"  # "relative" (count / total) or "count" (raw counts).
  c.normalize = True  # Rescale weights to mean 1 over corpus tokens.
  c.max_weight = ml_collections.FieldReference(None, field_type=float)  # Clip; None = off.
  c.chunked = ml_collections.FieldReference(None, field_type=bool)  # Loss from hidden states, chunked (no [B, L, V] logits; ce, pdl, itf, tlat); None: on for vocabularies >= 32000.
  c.chunk_strategy = ml_collections.FieldReference(None, field_type=str)  # When chunked: "tokens" (row chunks, 3 matmuls, as fast as the full logits on one device) or "vocab" (vocabulary chunks, 4 matmuls, smaller temporaries); None: "tokens" when the batch is on one device, "vocab" when it is split (tokens would all-reduce a [D, V] sum per row chunk).
  c.chunk_size = 4096  # Vocabulary columns per chunk when chunked with chunk_strategy "vocab".
  c.row_chunk_size = ml_collections.FieldReference(None, field_type=int)  # Token rows per chunk with chunk_strategy "tokens"; None: 512 (fewer where a [rows, V] float32 block would pass 512 MiB).
  c.window = True  # Logits only on each row's target span (max_target_len + 1 positions): same loss, less unembedding.
  c.reduction = ml_collections.FieldReference(None, field_type=str)  # Weighted losses: "weights" (sum of weights) or "tokens" (token count); None: the loss's paper.
  c.eos_weight = ml_collections.FieldReference(None, field_type=float)  # Weighted losses: EOS's weight in units of an average token; None: its frequency weight.
  c.itf_lambda = 0.4  # ITF (Nakamura et al. 2019): w = 1 / count ** itf_lambda.
  c.tlat_A = ml_collections.FieldReference(None, field_type=float)  # TLAT (Gu et al. 2020) scale A; None: weights in [1, e] as the authors' code.
  c.tlat_T = 1.0  # TLAT temperature T of exp(-T * count / median).
  c.ul_alpha = 1.0  # Unlikelihood (Welleck et al. 2019) weight of the candidate penalty.
  c.gamma = 2.0  # Focal loss exponent: -(1 - p) ** gamma * log p.
  c.smoothing = 0.1  # Label smoothing mass.
  c.gem_beta = 0.7  # GEM (Li et al. 2025) temperature of q = stopgrad(softmax(z / beta)).
  c.mile_gamma = 1.0  # MiLe (Su et al. 2024) exponent of the token weight (1 + entropy) ** gamma.
  return c


def get_mesh_config() -> ml_collections.ConfigDict:
  """Mesh sizes per axis; -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.data = -1  # Data-parallel axis: the batch is split over it; params replicated.
  c.fsdp = 1  # FSDP axis (ZeRO-3): the batch is split over it too, and params, gradients and optimizer state are sharded over their embed axis.
  c.model = 1  # Model (tensor-parallel) axis: vocabulary, MLP and heads are split over it.
  return c


def get_base_config(task: str) -> ml_collections.ConfigDict:
  """Defaults every experiment shares; a task config overrides what differs."""
  c = ml_collections.ConfigDict()
  c.task = task  # "summarization", "dialogue", "style_transfer" or "pretrain".
  c.seed = 0  # Init, shuffling and sampling seed.

  c.dataset = ml_collections.ConfigDict()  # Which data (pdl_jax/data/tasks.py).
  c.dataset.name = ml_collections.FieldReference(None, field_type=str)  # None: offline default.
  c.dataset.data_dir = ml_collections.FieldReference(None, field_type=str)  # TFDS data dir.
  c.dataset.max_train_examples = ml_collections.FieldReference(None, field_type=int)  # Cap.
  c.dataset.tune_examples = 0  # About this many train examples held out of training as the "tune" split, whole groups as the builders split (clusters, plays, chapters; eval.split="tune": choose e.g. the learning rate off the reported validation prompts); 0: none held out. The task datasets only (your own files: give a tuning file as dataset.validation).
  # Your own data: dataset.name = "files" (pdl_jax/data/files.py; docs/data.md).
  c.dataset.train = ml_collections.FieldReference(None, field_type=str)  # Training file or glob of shards (local or gs://), e.g. "data/train-*.jsonl"; dataset.name="files" only.
  c.dataset.validation = ml_collections.FieldReference(None, field_type=str)  # Validation file or glob; None: validation_fraction of train held out.
  c.dataset.validation_fraction = 0.05  # Share of train records held out (fixed seed) when there is no validation file.
  c.dataset.format = ml_collections.FieldReference(None, field_type=str)  # "jsonl", "csv" or "tsv"; None: from each file's suffix (.jsonl/.ndjson, .csv, .tsv).
  c.dataset.prompt_field = "prompt"  # Field (JSON key or CSV column) of the prompt text.
  c.dataset.target_field = "target"  # Field of the target text (the loss is on it).
  c.dataset.context_field = ml_collections.FieldReference(None, field_type=str)  # Optional field: a list of earlier turns, joined with the prompt by newlines (as the dialogue task).
  c.dataset.messages_field = ml_collections.FieldReference(None, field_type=str)  # Instead of prompt/target: a chat record's list of {role, content}; the last assistant message is the target, the messages before it the prompt.

  c.tokenizer = ml_collections.ConfigDict()  # Own model's SentencePiece (a pretrained model brings its own).
  c.tokenizer.path = ml_collections.FieldReference(None, field_type=str)  # None: WORKDIR/tokenizer.model (from init_from's run if set).
  c.tokenizer.vocab_size = 4000  # Pieces when the tokenizer is trained.
  c.tokenizer.train_sentences = 300_000  # Texts read to train it.

  c.model = ml_collections.ConfigDict()  # The decoder (pdl_jax/models/).
  c.model.pretrained = ml_collections.FieldReference(None, field_type=str)  # Hugging Face model directory (local or gs://): shape, weights and tokenizer from there; None: the own model below.
  c.model.preset = "small"  # Own model: "tiny", "small" or "base" (pdl_jax/models/config.py PRESETS).
  c.model.dtype = ml_collections.FieldReference(None, field_type=str)  # Compute dtype "float32" or "bfloat16"; None: bfloat16 on accelerators, float32 on CPU.
  c.model.param_dtype = "float32"  # Parameter dtype: float32 (master weights; "bfloat16" is refused for full finetuning: AdamW's small updates would be lost; with LoRA it is the frozen base's storage, the adapters stay float32).
  c.model.tied_embeddings = True  # Own model: output projection = embedding transposed.
  c.model.scan_layers = False  # Stack the layers' params and run them with one scan: compile time and HLO size flat in depth.
  c.model.attention = "auto"  # Attention implementation: "xla" (einsum; the reference), "splash" (Pallas kernel, TPU), "cudnn" (GPU), "auto" (splash on TPU, cudnn on GPU, xla on CPU: CPU results unchanged); pdl_jax/models/attention.py.
  c.model.remat = "none"  # Rematerialise each layer in the backward pass: "none", "full" (save only its input) or "dots" (save its matmul outputs).
  c.model.lora = ml_collections.ConfigDict()  # Low-rank adapters on a frozen pretrained base (pdl_jax/models/lora.py); rank 0: full finetuning.
  c.model.lora.rank = 0  # Adapter rank r; 0 = off. With r > 0 only the adapters train (model.pretrained is required).
  c.model.lora.alpha = 16.0  # Adapter scale alpha / r (PEFT's lora_alpha).
  c.model.lora.targets = ("q", "k", "v", "o", "gate", "up", "down")  # Projections that get an adapter: any of q, k, v, o (attention), gate, up, down (MLP).
  c.model.lora.dropout = 0.0  # Dropout on each adapter's input while training (PEFT's lora_dropout).
  c.model.lora.base_quant = "none"  # Frozen base storage (QLoRA): "none" (model.param_dtype; "bfloat16" is allowed with LoRA), "int8" (per column) or "nf4" (4-bit NormalFloat, blocks of 64).

  c.data = ml_collections.ConfigDict()  # How examples are laid out (pdl_jax/data/).
  c.data.packing = False  # Pack several training examples per row (first fit; attention within each, positions restart): less padding, same per-example loss. Evaluation never packs.
  c.data.prompt_format = ml_collections.FieldReference(None, field_type=str)  # "plain" (prompt, newline, target, EOS) or "chat" (user and assistant turns of the model's chat template; the loss on the assistant turn and its end-of-turn token); None: "chat" when the pretrained model has a chat template.
  c.data.chat_date = "2026-01-01"  # The date (YYYY-MM-DD) a chat template's strftime_now writes (Llama 3.2's "Today Date: ..."), pinned, not today's: every evaluation and a resumed run see one prompt. Part of the tokenizer's checksum for a template that dates.

  c.seq_len = 128  # Model input length: prompt + separator + target + EOS.
  c.max_target_len = 64  # Target tokens kept (the prompt is cut first).

  c.loss = get_loss_config()  # CE or PDL and its weights.
  c.mesh = get_mesh_config()  # Device mesh.

  c.optimizer = ml_collections.ConfigDict()  # AdamW, warmup + cosine.
  c.optimizer.learning_rate = 3e-3  # Peak learning rate (AdamW).
  c.optimizer.warmup_steps = 50  # Linear warmup, then cosine decay to end_fraction.
  c.optimizer.end_fraction = 0.1  # Final learning rate / peak.
  c.optimizer.weight_decay = 0.01  # AdamW decoupled weight decay.
  c.optimizer.grad_clip = 1.0  # Global-norm gradient clipping.
  c.optimizer.b2 = 0.98  # Adam second-moment decay.
  c.optimizer.grad_accum_steps = 1  # Micro-batches per optimizer step (batch_size stays the global batch of one step): exact, the loss's numerator and denominator are summed separately.

  c.batch_size = 32  # Global batch (sequences) of one optimizer step; divided over the data x fsdp axes.
  c.num_steps = 800  # Training steps.
  c.log_every = 25  # Steps between train metric lines.
  c.eval_every = 400  # Steps between evaluations (and one at the end).
  c.checkpoint_every = 200  # Steps between checkpoints (and one at the end).
  c.keep_checkpoints = 1  # Checkpoints kept: the latest, all that resuming and export need (orbax deletes the older one only once the new one is complete); more for going back to earlier steps.

  c.eval = ml_collections.ConfigDict()  # Evaluation on a fixed validation subset.
  c.eval.num_examples = 256  # Fixed validation subset: its first N examples.
  c.eval.split = "validation"  # The split evaluated: "validation" (the prompts results report) or "tune" (dataset.tune_examples held out of train).
  c.eval.sampled_examples = ml_collections.FieldReference(None, field_type=int)  # Prompts of the sampled decodings (top_p, top_p_bias...): the first N of the eval prompts; None: all of them.
  c.eval.batch_size = 64  # Sequences per eval / decode batch.
  c.eval.decode = "greedy"  # "greedy", "beam" or "top_p": logged as eval/<metric>.
  c.eval.extra_decodes = ("top_p",)  # More decodings of the same prompts, logged as eval/<method>/<metric>.
  c.eval.max_new_tokens = 48  # Generated tokens at most.
  c.eval.length_bucket = 64  # Decode prompts in order of length, each batch padded to a multiple of this (0: in order, all padded to the longest); the generations are the same up to the float rounding of near-ties.
  c.eval.beam_size = 4  # Beams for decode="beam".
  c.eval.top_p = 0.9  # Nucleus mass for decode="top_p".
  c.eval.temperature = 1.0  # Sampling temperature for decode="top_p".
  c.eval.num_samples = 32  # (input, reference, generation) triples written per eval.
  c.eval.at_start = ml_collections.FieldReference(None, field_type=bool)  # Evaluate before the first step (logged as step 0: the base model's row); None: when finetuning a pretrained model.

  c.init_from = ml_collections.FieldReference(None, field_type=str)  # Workdir whose latest params start this run.
  c.skip_nonfinite_steps = False  # Skip (and count) steps with a non-finite loss or gradient instead of stopping.
  c.resume = True  # Resume from WORKDIR's latest checkpoint if there is one.
  c.steps_per_run = ml_collections.FieldReference(None, field_type=int)  # Stop (with a checkpoint) after this many steps; None: run to num_steps.

  c.sweep = ml_collections.ConfigDict()  # The alpha sweep of this config.
  c.sweep.alphas = (0.25, 0.5, 1.0)  # PDL alphas of the sweep (alpha 0 is CE: include_ce).
  c.sweep.seeds = (0,)  # Seeds per alpha.
  c.sweep.include_ce = True  # Also run loss=ce (alpha is then ignored).
  c.sweep.eos_weight_alphas = ()  # PDL points with loss.eos_weight=1 at these alphas.
  c.sweep.baselines = ()  # Baseline losses, one point each (loss names, see pdl_jax/losses/registry.py).
  c.sweep.ce_decodes = ()  # Extra decodes of the CE points only, e.g. "greedy_bias0.25" (CE + a decoding-time frequency bias: PDL's free control).
  return c


# The base model the task configs finetune by default: a real pretrained model that is
# obtainable offline (pdl_jax/models/hf/offline.py; fetched and converted on first use).
DEFAULT_PRETRAINED = "smollm2-135m-instruct"


def wants_pretrained(arg: str | None) -> bool:
  """Whether a task config's argument keeps the default pretrained base: not when it
  picks the own model (`pretrained=none`, `model=PRESET`, `smoke`) or starts from an
  own-model run (`init_from=` without `pretrained=`)."""
  items = {i.strip().partition("=")[0]: i.strip().partition("=")[2]
           for i in (arg or "").split(",") if i.strip()}
  if "pretrained" in items:
    return items["pretrained"].lower() != "none"
  return not ({"smoke", "model", "init_from"} & set(items))


def use_pretrained(c: ml_collections.ConfigDict, name: str = DEFAULT_PRETRAINED) -> None:
  """Finetune the pretrained `name` instead of training the own model: its weights,
  tokenizer and chat format, a finetuning learning rate, an evaluation of the base
  model at step 0, and a run sized to about 15 minutes on a 2-core CPU."""
  c.model.pretrained = name  # Weights, tokenizer and chat template from there.
  c.loss.alpha = 0.25  # PDL's alpha on the real base (docs/results.md): greedy, 0.25 stayed within 1.2 ROUGE-L of CE in every task where 0.5 lost 1.7 (dialogue) to 10.7 (style transfer), with more loops and prompt copies; against the free control (CE + bias 0.25) no difference was detectable.
  c.optimizer.learning_rate = 2e-4  # Finetuning rate (docs/pretrained.md: a CE sweep; 3e-3 wrecks the model).
  c.optimizer.warmup_steps = 10  # Short: the model is trained already.
  c.batch_size = 8  # Sequences per step: 135 M params at about 200 real tokens/s on 2 CPU cores.
  c.num_steps = 60  # About 15 minutes here with the two evaluations (dialogue: ~7.7 s a step).
  c.log_every = 10  # Steps between train metric lines.
  c.eval_every = 60  # Step 0 (the base model, eval.at_start) and the end.
  c.checkpoint_every = 30  # Steps between checkpoints.
  c.eval.num_examples = 256  # Evaluation prompts: the paired intervals of the comparison are over them (decoding costs ~0.1 s a token at batch 64 on 2 CPU cores).
  # The comparison on the real model (docs/results.md): every point from the same base
  # at the same compute; summarization and style transfer run the full set (their configs).
  c.sweep.alphas = (0.25, 0.5)  # PDL alphas.
  c.sweep.seeds = (0, 1)  # Two seeds for every trained point.
  c.sweep.eos_weight_alphas = (0.5,)  # PDL 0.5 with EOS weight 1: word choice vs length.
  c.sweep.baselines = ("itf", "tlat_exp", "label_smoothing") + RECENT_BASELINES  # The baselines every task runs.
  c.sweep.ce_decodes = CE_CONTROL_DECODES  # CE + frequency bias at four strengths: the control.


def apply_quick(c: ml_collections.ConfigDict) -> None:
  """The quick real-model comparison (experiments/compare.py): CE, CE decoded with the
  frequency bias, and PDL at alpha 0.25 on the pretrained base, each a few minutes on 2
  CPU cores: fewer steps and prompts, greedy decoding only, one seed.

  Raises:
    ValueError: the config does not finetune a pretrained model (`smoke`, `model=`,
      `pretrained=none`: the quick comparison is of the real base).
  """
  if c.model.pretrained is None:
    raise ValueError("config argument 'quick' compares losses on the pretrained base; "
                     "it does not combine with 'smoke', 'model=' or 'pretrained=none'.")
  c.num_steps = 24  # Two fifths of the comparison's budget (its learning rate, warm-up, batch): both points in under 10 minutes.
  c.log_every = 5  # Steps between train metric lines.
  c.eval_every = 24  # Step 0 (the base model, CE point only) and the end.
  c.checkpoint_every = 24  # One checkpoint, at the end.
  c.eval.num_examples = 64  # Prompts: enough to read generations, too few for small differences.
  c.eval.extra_decodes = ()  # Greedy only (the CE point adds its biased greedy decode).
  c.sweep.alphas = (0.25,)  # PDL at alpha 0.25.
  c.sweep.seeds = (0,)  # One seed.
  c.sweep.eos_weight_alphas = ()  # No EOS variant.
  c.sweep.baselines = ()  # No baselines.
  c.sweep.ce_decodes = ("greedy_bias0.25",)  # CE + the frequency bias of PDL 0.25's optimum.


def apply_long(c: ml_collections.ConfigDict) -> None:
  """The longer budget of the real-model comparison (docs/results.md): 600 steps, 10x
  the committed 60 at the same batch, warm-up and schedule shape; a final evaluation
  only (the base model's row is the 60-step comparison's), greedy on 1,024 validation
  prompts and the sampled decodings on their first 256; CE with the control's biased
  decodes, PDL 0.25 and MiLe, two seeds.

  Raises:
    ValueError: the config does not finetune a pretrained model.
  """
  if c.model.pretrained is None:
    raise ValueError("config argument 'long' is the real-model comparison's longer budget; "
                     "it does not combine with 'smoke', 'model=', 'init_from=' (an own-model "
                     "run) or 'pretrained=none'.")
  c.num_steps = 600  # 10x the comparison's 60 steps of batch 8: 10% of an epoch of summarization.
  c.eval_every = 600  # The final evaluation only.
  c.eval.at_start = False  # The base model's row is the 60-step comparison's (1,024 prompts cost ~15 min here).
  c.checkpoint_every = 100  # Steps between checkpoints (a run takes hours here).
  c.log_every = 25  # Steps between train metric lines.
  c.eval.num_examples = 1024  # Greedy on 1,024 validation prompts: detects about half the difference 256 do.
  c.eval.sampled_examples = 256  # Top-p (and its biased form) on the first 256 of them.
  c.sweep.alphas = (0.25,)  # PDL at alpha 0.25 (the pretrained default).
  c.sweep.seeds = (0, 1)  # Two seeds.
  c.sweep.eos_weight_alphas = ()  # No EOS variant.
  c.sweep.baselines = ("mile",)  # The best of DFT / GEM / MiLe at 60 steps in summarization: MiLe, the one above CE on greedy ROUGE-L (+1.3 [+0.1, +2.6]).
  c.sweep.ce_decodes = CE_CONTROL_DECODES  # CE + the frequency bias: the control.


def apply_tune(c: ml_collections.ConfigDict) -> None:
  """Evaluate on the tune split instead of the reported validation prompts: the
  about 512 train examples held out of training as whole groups (config.dataset.tune_examples),
  greedy only; for choosing the learning rate (`lr=`) of a budget such as `long`."""
  c.dataset.tune_examples = 512  # About 512 train examples held out, in whole groups.
  c.eval.split = "tune"  # Evaluated on them.
  c.eval.num_examples = 512  # All of them.
  c.eval.extra_decodes = ()  # Greedy only.
  c.eval.sampled_examples = None  # (No sampled decoding.)
  c.eval.at_start = False  # The choice is between trained points.
  c.sweep.ce_decodes = ()  # No control decodes: the rate is chosen per loss.
  c.sweep.seeds = (0,)  # One seed per rate.


def apply_smoke(c: ml_collections.ConfigDict) -> None:
  """Shrink everything so a run finishes in about a minute on a laptop CPU."""
  c.model.preset = "tiny"
  c.tokenizer.vocab_size = 2000
  c.tokenizer.train_sentences = 20_000
  c.dataset.max_train_examples = 4000
  c.seq_len = 96
  c.max_target_len = 32
  c.batch_size = 16
  c.num_steps = 60
  c.log_every = 10
  c.eval_every = 60
  c.checkpoint_every = 30
  c.optimizer.warmup_steps = 10
  c.eval.num_examples = 32
  c.eval.batch_size = 32
  c.eval.max_new_tokens = 16
  c.eval.num_samples = 8


def parse_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies the words (`smoke`, `quick`, `long`, `tune`) and `key=value` items of a
  comma-separated config argument.

  Raises:
    ValueError: an unknown item, naming it and the allowed ones.
  """
  if not arg:
    return c
  items = [i.strip() for i in arg.split(",") if i.strip()]
  # The words first, whatever their place: one budget (smoke, quick or long), then
  # tune (which evaluates that budget on the tune split), then the key=value items.
  budgets = [i for i in items if i in ("smoke", "quick", "long")]
  if len(budgets) > 1:
    raise ValueError(f"config argument {arg!r} names {budgets}; give at most one of "
                     "'smoke', 'quick' and 'long' (each sets the whole budget).")
  for word in budgets:
    {"smoke": apply_smoke, "quick": apply_quick, "long": apply_long}[word](c)
  if "tune" in items:
    apply_tune(c)
  for item in items:
    if item in ARG_WORDS:
      continue
    key, sep, value = item.partition("=")
    if not sep or key not in ARG_KEYS:
      near = difflib.get_close_matches(key, sorted(ARG_KEYS) + ARG_WORDS, n=1)
      raise ValueError(f"config argument {item!r} is unknown"
                       + (f" (did you mean {near[0]!r}?)" if near else "")
                       + f"; expected one of {ARG_WORDS} or key=value with key one of "
                       f"{sorted(ARG_KEYS)}.")
    path = ARG_KEYS[key].split(".")
    node = c
    for part in path[:-1]:
      node = node[part]
    try:
      node[path[-1]] = _parse_value(value, node.get_type(path[-1]))
    except ValueError as e:
      raise ValueError(f"config argument {item!r}: {e}") from None
  return c


def _parse_value(text: str, field_type: type):
  """`text` as a value of the field's declared type; 'none' gives None."""
  if text.lower() == "none":
    return None
  if field_type is bool:
    if text.lower() not in ("true", "false", "1", "0"):
      raise ValueError(f"expected true or false; got {text!r}.")
    return text.lower() in ("true", "1")
  if field_type in (int, float):
    try:
      return field_type(text)
    except ValueError:
      raise ValueError(f"expected {field_type.__name__}; got {text!r}.") from None
  return text


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config of `path.py[:arg]`, as `--config=` gives it to main.py: the one
  loader for experiments/ and launch.sh.

  Raises:
    FileNotFoundError: no such config file.
  """
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist (from {spec!r}).")
  module_spec = importlib.util.spec_from_file_location("loaded_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)
