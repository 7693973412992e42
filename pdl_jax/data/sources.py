"""Where a split's texts come from: a TFDS dataset (the offline builders or a hub
dataset by name) or the user's own files, as (prompts, targets) lists."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import time
from typing import Sequence
import jax
from pdl_jax.data import tasks as tasks_lib
from pdl_jax.data import files as data_files
from pdl_jax import multihost


def held_out_groups(groups: Sequence[str], holdout: int) -> set[str]:
  """The groups of the tune split: whole groups, in the order of a sha256 of their
  key (salted: not the builders' split hash), until they hold at least `holdout` of
  the examples whose groups are `groups`."""
  sizes = collections.Counter(groups)
  order = sorted(sizes, key=lambda g: hashlib.sha256(f"tune:{g}".encode()).hexdigest())
  chosen, held = set(), 0
  for group in order:
    if held >= holdout:
      break
    chosen.add(group)
    held += sizes[group]
  return chosen


def load_texts(spec: tasks_lib.DatasetSpec, split: str, *, data_dir: str | None,
               limit: int | None = None, holdout: int = 0, log=multihost.log
               ) -> tuple[list[str], list[str]]:
  """(prompts, targets) of a TFDS split (its first `limit` examples if given).

  `holdout` > 0 holds about `holdout` train examples out of "train": they are the
  split "tune" (config.dataset.tune_examples), on which a setting can be chosen
  without the validation prompts the results report. Held out as the builders split:
  whole groups (spec.group_keys: a near-duplicate cluster, a play, a chapter), so no
  tune prompt has a near-duplicate or a neighbouring turn among the training
  targets; a dataset without group features (a hub dataset) holds out its last
  `holdout` examples.

  Builds the dataset first if needed (the offline builders fetch their sources):
  process 0 builds, the others wait for it, so that several processes never write
  one data_dir at once.

  Raises:
    ValueError: split "tune" without a holdout, or a holdout the train split cannot
      spare.
  """
  import tensorflow_datasets as tfds

  import pdl_jax.data.builders  # noqa: F401  registers the offline builders

  start = time.perf_counter()
  if jax.process_index() == 0:
    tfds.builder(spec.tfds_name, data_dir=data_dir).download_and_prepare()  # no-op once built
  multihost.sync(f"prepare {spec.tfds_name}")
  builder = tfds.builder(spec.tfds_name, data_dir=data_dir)  # sees process 0's build
  if split == "tune" and holdout < 1:
    raise ValueError("the split 'tune' (config.eval.split) needs "
                     "config.dataset.tune_examples >= 1 train examples held out.")
  held = holdout > 0 and split in ("train", "tune")
  tfds_split = spec.splits["train" if split == "tune" else split]
  size = None
  if held or limit is not None:
    try:  # a slice past the end is an error in TFDS: a limit above the size means all
      size = builder.info.splits[tfds_split].num_examples
    except (KeyError, TypeError, AttributeError):  # not built / no info (a mock)
      size = None
  if held and size is not None and holdout >= size:
    raise ValueError(f"config.dataset.tune_examples={holdout}: the {spec.tfds_name} "
                     f"train split has {size} examples; hold out fewer.")
  what = tfds_split
  if held and not spec.group_keys:
    tfds_split += f"[-{holdout}:]" if split == "tune" else f"[:-{holdout}]"
    what = tfds_split
  elif held:
    what = f"{tfds_split} ({split}: whole {'/'.join(spec.group_keys)} groups)"
  elif limit is not None and (not size or limit < size):
    tfds_split = f"{tfds_split}[:{limit}]"
    what = tfds_split
  ds = builder.as_dataset(split=tfds_split, shuffle_files=False)
  rows = []  # (prompt, target, group)
  for ex in tfds.as_numpy(ds):
    # A limit inside a held-out tail slice is applied here (TFDS slices do not nest);
    # without a holdout the slice itself holds it.
    if held and not spec.group_keys and limit is not None and len(rows) >= limit:
      break
    group = "/".join(tasks_lib.text(ex[k]) for k in spec.group_keys) if held else ""
    rows.append((*spec.format(ex), group))
  if held and spec.group_keys:
    tune = held_out_groups([g for _, _, g in rows], holdout)
    if len(tune) == len({g for _, _, g in rows}):
      raise ValueError(f"config.dataset.tune_examples={holdout}: the {spec.tfds_name} "
                       f"train split's groups would all be held out; hold out fewer.")
    rows = [r for r in rows if (r[2] in tune) == (split == "tune")][:limit]
  prompts, targets = [r[0] for r in rows], [r[1] for r in rows]
  log(f"data: {spec.tfds_name} {what}: {len(prompts)} examples "
      f"({time.perf_counter() - start:.1f} s)")
  return prompts, targets


def load_split_texts(task: str, dataset_cfg, split: str, limit: int | None = None
                     ) -> tuple[list[str], list[str]]:
  """(prompts, targets) of a split of `task`: of its TFDS dataset, or of the user's
  files (dataset settings `dataset_cfg`, config.dataset; name "files":
  pdl_jax.data.files); for pretraining, whole documents of every default corpus as
  targets."""
  # Every process reads the whole (small, offline) split and takes its rows of each
  # global batch (TrainBatches).
  if dataset_cfg.name == tasks_lib.FILES:
    return data_files.load_split(dataset_cfg, split, limit)
  kwargs = dict(data_dir=dataset_cfg.data_dir, limit=limit,
                holdout=dataset_cfg.get("tune_examples") or 0)
  if task != tasks_lib.PRETRAIN:
    return load_texts(tasks_lib.get_dataset(task, dataset_cfg.name), split, **kwargs)
  prompts, targets = [], []
  for name in sorted(tasks_lib.DEFAULT_DATASET):
    raw = dataclasses.replace(tasks_lib.get_dataset(name), prompt="{inputs}")
    p, t = load_texts(raw, split, **kwargs)
    prompts.extend([""] * len(p))
    targets.extend(f"{a}\n{b}" for a, b in zip(p, t))
  return prompts, targets
