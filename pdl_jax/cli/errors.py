"""One line for a bad command instead of a traceback: the entry points run through
`run`, which turns a bad flag, a misspelled config field, a bad `:key=value` config
argument, a wrong type or a bad data file into `error: <what and what is allowed>` and a
non-zero exit. `--debug` keeps Python's traceback (for a bug, not a bad input)."""

from __future__ import annotations

import difflib
import re
import sys
from typing import Callable, Sequence

from absl import app, flags

DEBUG = "--debug"
# What a bad input raises before (or instead of) long work: the project's checks raise
# ValueError (DataFileError is one) or FileNotFoundError naming the bad value. Anything
# else is a bug and keeps its traceback.
INPUT_ERRORS = (ValueError, FileNotFoundError, flags.Error)
USAGE_EXIT, INPUT_EXIT = 2, 1

flags.DEFINE_bool("debug", False, "show Python's traceback for a bad flag, config value or "
                  "data file instead of the one-line error")


def _chain(error: BaseException) -> list[BaseException]:
  """error, then what it was raised from or while handling, outermost first."""
  out = [error]
  while (nxt := out[-1].__cause__ or out[-1].__context__) is not None and nxt not in out:
    out.append(nxt)
  return out


def _missing_field(chain: list[BaseException], argv: Sequence[str]) -> str | None:
  """A `--config.a.b=value` override of a field the config lacks (ml_collections raises
  a chain of KeyErrors and AttributeErrors ending in its "Did you mean" text)."""
  for e in chain:
    if not isinstance(e, (KeyError, AttributeError)):
      continue
    text = str(e.args[0]) if e.args else ""
    field = re.match(r"""^['"]?([\w.]+)""", text.strip("'\""))
    if field is None:
      continue
    overrides = [a for a in argv if a.startswith("--config.")]
    flag = next((a for a in overrides
                 if re.fullmatch(rf"--config\.(?:[\w.]+\.)?{field[1]}(=.*)?", a)), None)
    if flag is None:
      continue
    path = flag.removeprefix("--config.").split("=", 1)[0]
    message = f"{flag}: the config has no field {path!r}"
    suggestions = [re.search(r'Did you mean "([\w.]+)"', str(x)) for x in chain]
    near = next((m[1] for m in suggestions if m), None)
    if near is not None:
      message += f"; did you mean {'.'.join(path.split('.')[:-1] + [near])!r}?"
    return message + " (the fields: configs/common.py, docs/experiments.md)."
  return None


def describe(error: BaseException, argv: Sequence[str]) -> str:
  """The one-line message for `error`, raised by parsing `argv` or by the run."""
  chain = _chain(error)
  missing = _missing_field(chain, argv)
  if missing is not None:
    return missing
  text = str(error)
  if isinstance(error, flags.Error) and "Traceback (most recent call last)" in text:
    # ml_collections puts the config file's traceback into the flag error's text: its
    # last line is the error get_config raised.
    flag = text.split(": ", 1)[0].removeprefix("flag ")
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return f"{flag}: {re.sub(r'^[A-Za-z_.]*(Error|Exception): ', '', last)}"
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  return with_nearest(" ".join(line.strip() for line in text.splitlines() if line.strip()))


def with_nearest(message: str) -> str:
  """A "<key>='value'; expected one of [...]" message with the nearest allowed value
  added ("did you mean 'pdl'?"), where one is close."""
  m = re.search(r"""=(['"])([^'"]*)\1; expected one of [\[(]([^\])]*)[\])]""", message)
  if m is None or "did you mean" in message:
    return message
  allowed = re.findall(r"""['"]([^'"]*)['"]""", m[3])
  near = difflib.get_close_matches(m[2], allowed, n=1)
  return message.rstrip(".") + f" (did you mean {near[0]!r}?)." if near else message


def _fail(error: BaseException, argv: Sequence[str], status: int) -> None:
  print(f"error: {describe(error, argv)}\n(add {DEBUG} for the traceback)", file=sys.stderr,
        flush=True)
  sys.exit(status)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """absl's app.run(main) with bad input reported in one message: a flag or config
  that does not parse exits 2, an input the run refuses (ValueError,
  FileNotFoundError) exits 1; with --debug both raise as usual."""
  argv = list(sys.argv if argv is None else argv)
  debug = DEBUG in argv or f"{DEBUG}=true" in argv

  def parse(args: list[str]) -> list[str]:
    try:
      return flags.FLAGS(args)
    except Exception as e:  # pylint: disable=broad-except
      if debug:
        raise
      _fail(e, argv, USAGE_EXIT)
      raise  # unreachable: _fail exits

  def guarded(args: list[str]) -> None:
    try:
      main(args)
    except INPUT_ERRORS as e:
      if debug:
        raise
      _fail(e, argv, INPUT_EXIT)

  app.run(guarded, argv=argv, flags_parser=parse)
