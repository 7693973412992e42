"""Bad commands end in one message naming the bad value and what is allowed (with the
nearest match), a non-zero exit and no traceback unless --debug (pdl_jax/cli/errors.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from absl import flags

from pdl_jax.cli import errors

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_main(*args: str, cwd: str = ROOT) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "pdl_jax.main", *args], cwd=cwd,
                        capture_output=True, text=True, timeout=300)


def the_error(done: subprocess.CompletedProcess) -> str:
  """The one message (stderr's lines that are not progress: the error and the hint)."""
  assert done.returncode != 0, done.stderr
  assert "Traceback" not in done.stderr, done.stderr
  lines = [l for l in done.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, done.stderr
  assert done.stderr.rstrip().endswith("(add --debug for the traceback)"), done.stderr
  return lines[0]


@pytest.mark.parametrize("args,status,expected", [
    # A misspelled field: ml_collections' 55-line chained traceback before.
    (["--config.loss.alhpa=0.25"], 2,
     "error: --config.loss.alhpa=0.25: the config has no field 'loss.alhpa'; did you mean "
     "'loss.alpha'?"),
    # A misspelled config argument key.
    (["--config=configs/dialogue.py:smoke,alpah=0.25"], 2,
     "error: --config=configs/dialogue.py:smoke,alpah=0.25: config argument 'alpah=0.25' is "
     "unknown (did you mean 'alpha'?)"),
    # A wrong type.
    (["--config.loss.alpha=abc"], 2,
     "error: flag --config.loss.alpha=abc: could not convert string to float: 'abc'"),
    # A value outside the allowed ones, found by the run's checks.
    (["--config.loss.name=pld"], 1,
     "error: config.loss.name='pld'; expected one of ("),
])
def test_a_bad_config_is_one_message(args, status, expected, tmp_path):
  if not args[0].startswith("--config="):
    args = ["--config=configs/dialogue.py:smoke", *args]
  done = run_main(*args, f"--workdir={tmp_path / 'w'}")
  assert the_error(done).startswith(expected)
  assert done.returncode == status
  assert not (tmp_path / "w").exists()  # refused before anything was written


def test_the_nearest_allowed_value_is_named(tmp_path):
  done = run_main("--config=configs/dialogue.py:smoke", "--config.loss.name=pld",
                  f"--workdir={tmp_path / 'w'}")
  assert the_error(done).endswith("(did you mean 'pdl'?).")


def test_a_bad_data_file_is_one_message_naming_its_line(tmp_path):
  bad = tmp_path / "train.jsonl"
  bad.write_text('{"prompt": "a", "target": "b"}\n{"prompt": "x", "target": "open}\n')
  done = run_main("--config=configs/dialogue.py:smoke", "--config.dataset.name=files",
                  f"--config.dataset.train={bad}", f"--workdir={tmp_path / 'w'}")
  assert the_error(done) == (
      f"error: {bad}: line 2: malformed JSON (Unterminated string starting at: column 27); "
      "expected one JSON object per line.")
  assert done.returncode == 1


def test_debug_keeps_the_traceback(tmp_path):
  done = run_main("--config=configs/dialogue.py:smoke", "--config.loss.name=pld", "--debug",
                  f"--workdir={tmp_path / 'w'}")
  assert done.returncode != 0
  assert "Traceback" in done.stderr and "ValueError: config.loss.name='pld'" in done.stderr


def test_a_bug_keeps_its_traceback():
  """Only bad input is turned into one line: an error the project's checks do not
  raise (a bug) propagates as usual."""
  def main(argv):
    raise RuntimeError("a bug")

  with pytest.raises(RuntimeError, match="a bug"):
    errors.run(main, argv=["prog"])


def test_an_input_error_exits_with_one_line(capsys):
  def check_settings():  # the project's checks are functions named check*/validate*
    raise ValueError("config.x=3; expected one of ['a', 'b'].\n  second line")

  def main(argv):
    check_settings()

  with pytest.raises(SystemExit) as exit_info:
    errors.run(main, argv=["prog"])
  assert exit_info.value.code == errors.INPUT_EXIT
  err = capsys.readouterr().err
  assert err == ("error: config.x=3; expected one of ['a', 'b']. second line\n"
                 "(add --debug for the traceback)\n")


def test_a_value_error_outside_the_checks_is_a_bug_with_its_place_and_traceback(capsys):
  """A ValueError deep in a run (a shape bug) is not called bad input: the message
  names its type and where it was raised, and the traceback is kept in a file."""
  def main(argv):
    import numpy as np
    np.zeros(3) + np.zeros(4)

  with pytest.raises(SystemExit) as exit_info:
    errors.run(main, argv=["prog"])
  assert exit_info.value.code == errors.INPUT_EXIT
  first, hint = capsys.readouterr().err.splitlines()
  assert first.startswith(f"error: ValueError at {__file__}:") and "broadcast" in first
  path = hint.removeprefix("(the traceback: ").split(";")[0]
  with open(path) as f:
    text = f.read()
  os.unlink(path)
  assert "Traceback (most recent call last)" in text and "np.zeros(3) + np.zeros(4)" in text


def test_an_error_in_a_config_file_names_its_type_and_line(tmp_path):
  config = tmp_path / "bad_config.py"
  config.write_text("def get_config(arg=None):\n  return undefined_name\n")
  done = run_main(f"--config={config}", f"--workdir={tmp_path / 'w'}")
  assert the_error(done) == (f"error: NameError at {config}:2: name 'undefined_name' is "
                            "not defined")


@pytest.mark.parametrize("argv,debug", [
    (["--debug"], True), (["--debug=True"], True), (["--debug=1"], True),
    (["--debug=false"], False), (["--nodebug"], False), ([], False)])
def test_wants_debug(argv, debug):
  assert errors.wants_debug(["prog", *argv]) == debug


def test_a_message_less_error_is_named_by_its_type():
  assert errors.describe(ValueError(), []) == "ValueError"


def test_a_missing_field_is_read_only_while_parsing():
  """A run's error raised while handling a KeyError named like an overridden field is
  not reported as a misspelled field."""
  try:
    try:
      raise KeyError("alpha")
    except KeyError:
      raise ValueError("bad batch")
  except ValueError as e:
    error = e
  argv = ["prog", "--config.loss.alpha=0.3"]
  assert errors.describe(error, argv) == "bad batch"
  assert "has no field" in errors.describe(error, argv, parsing=True)


@pytest.mark.parametrize("message,expected", [
    ("config.loss.name='pld'; expected one of ('ce', 'pdl').",
     "config.loss.name='pld'; expected one of ('ce', 'pdl') (did you mean 'pdl'?)."),
    ("config.task='zzz'; expected one of ['dialogue', 'summarization'].",
     "config.task='zzz'; expected one of ['dialogue', 'summarization']."),  # none is near
    ("no list here", "no list here"),
])
def test_with_nearest(message, expected):
  assert errors.with_nearest(message) == expected


def test_describe_takes_get_configs_error_out_of_the_flag_errors_traceback_text():
  text = ("flag --config=configs/x.py:a=1: Error whilst parsing config file:\n\n"
          "  Traceback (most recent call last):\n    File \"x\", line 1\n"
          "  ValueError: config argument 'a=1' is unknown.\n")
  assert errors.describe(flags.IllegalFlagValueError(text), []) == (
      "--config=configs/x.py:a=1: config argument 'a=1' is unknown.")
