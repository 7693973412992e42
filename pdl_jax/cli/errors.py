"""One line for a bad command instead of a traceback: the entry points run through
`run`, which turns a bad flag, a misspelled config field, a bad `:key=value` config
argument, a wrong type, a value the run's checks refuse or a bad data file into
`error: <what and what is allowed>` and a non-zero exit. `--debug` keeps Python's
traceback.

Only bad input is shortened: an error of a flag or config file while parsing, and a
ValueError or FileNotFoundError raised inside the project's checks and readers of
input (CHECK_FILES, CHECK_FUNCTIONS). Anything else is a bug: it says where it was
raised, and its whole traceback goes to a file the message names."""

from __future__ import annotations

import difflib
import re
import sys
import tempfile
import traceback
from typing import Callable, Sequence

from absl import app, flags

DEBUG = "--debug"
INPUT_ERRORS = (ValueError, FileNotFoundError)
# Where the project checks its input: an error raised in these files, or in a function
# of these names anywhere in the package (each part's check(settings)), is bad input.
CHECK_FILES = ("pdl_jax/config_checks.py", "pdl_jax/data/files.py",
               "pdl_jax/models/hf/locate.py", "pdl_jax/models/hf/offline.py",
               "configs/common.py")
CHECK_FUNCTIONS = re.compile(r"^(check\w*|validate\w*|_?check_\w*|parse_\w*)$")
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


def _frames(error: BaseException) -> list[traceback.FrameSummary]:
  return traceback.extract_tb(error.__traceback__)


def is_input_error(error: BaseException) -> bool:
  """Whether a run's error is bad input (module docstring), not a bug."""
  if not isinstance(error, INPUT_ERRORS):
    return False
  return any(f.filename.replace("\\", "/").endswith(CHECK_FILES)
             or CHECK_FUNCTIONS.match(f.name) for f in _frames(error))


def describe(error: BaseException, argv: Sequence[str], parsing: bool = False) -> str:
  """The one-line message for `error`, raised by parsing `argv` (parsing=True) or by
  the run."""
  if parsing:
    missing = _missing_field(_chain(error), argv)
    if missing is not None:
      return missing
  text = str(error)
  if isinstance(error, flags.Error) and "Traceback (most recent call last)" in text:
    # ml_collections puts the config file's traceback into the flag error's text: its
    # last line is the error get_config raised, its last `File` line where.
    flag = text.split(": ", 1)[0].removeprefix("flag ")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    where = [l for l in lines if l.startswith("File ")]
    message = re.sub(r"^([A-Za-z_.]*(Error|Exception)): ", "", lines[-1])
    if not re.match(r"^[A-Za-z_.]*(Error|Exception): ", lines[-1]):
      message = lines[-1]
    elif not re.match(r"^(ValueError|KeyError|FileNotFoundError): ", lines[-1]):
      message = lines[-1]  # not a check's error: keep its type
    if where and not message.startswith("config argument"):
      message += f" ({where[-1].removeprefix('File ')})"
    return f"{flag}: {message}"
  if isinstance(error, KeyError) and error.args:
    text = str(error.args[0])
  text = " ".join(line.strip() for line in text.splitlines() if line.strip())
  return with_nearest(text or type(error).__name__)


def with_nearest(message: str) -> str:
  """A "<key>='value'; expected one of [...]" message with the nearest allowed value
  added ("did you mean 'pdl'?"), where one is close."""
  m = re.search(r"""=(['"])([^'"]*)\1; expected one of [\[(]([^\])]*)[\])]""", message)
  if m is None or "did you mean" in message:
    return message
  allowed = re.findall(r"""['"]([^'"]*)['"]""", m[3])
  near = difflib.get_close_matches(m[2], allowed, n=1)
  return message.rstrip(".") + f" (did you mean {near[0]!r}?)." if near else message


def _fail(message: str, status: int, hint: str = f"(add {DEBUG} for the traceback)"
          ) -> None:
  print(f"error: {message}\n{hint}", file=sys.stderr, flush=True)
  sys.exit(status)


def _bug(error: BaseException) -> None:
  """A run's error that is not bad input: where it was raised, its traceback in a file."""
  with tempfile.NamedTemporaryFile("w", prefix="pdl_jax_error_", suffix=".txt",
                                   delete=False) as f:
    traceback.print_exception(error, file=f)
  last = _frames(error)[-1] if _frames(error) else None
  where = f" at {last.filename}:{last.lineno}" if last else ""
  _fail(f"{type(error).__name__}{where}: {describe(error, [])}", INPUT_EXIT,
        f"(the traceback: {f.name}; {DEBUG} prints it)")


def wants_debug(argv: Sequence[str]) -> bool:
  """Whether argv holds --debug (or --debug=true/1/yes, any case)."""
  return any(a == DEBUG or (a.startswith(f"{DEBUG}=") and
                            a.split("=", 1)[1].lower() in ("true", "1", "yes", "t", "y"))
             for a in argv)


def run(main: Callable[[list[str]], None], argv: Sequence[str] | None = None) -> None:
  """absl's app.run(main) with bad input reported in one message: a flag or config
  that does not parse exits 2, an input the run's checks refuse exits 1; another
  ValueError or FileNotFoundError (a bug) exits 1 naming where it was raised and the
  file holding its traceback. With --debug every error raises as usual."""
  argv = list(sys.argv if argv is None else argv)
  debug = wants_debug(argv)

  def parse(args: list[str]) -> list[str]:
    try:
      return flags.FLAGS(args)
    except Exception as e:  # pylint: disable=broad-except
      if debug:
        raise
      message = describe(e, argv, parsing=True)
      if not isinstance(e, (flags.Error, ValueError, KeyError, AttributeError, TypeError)):
        # An error of the config file's own code (a NameError): its type and place.
        last = _frames(e)[-1] if _frames(e) else None
        where = f" at {last.filename}:{last.lineno}" if last else ""
        message = f"{type(e).__name__}{where}: {message}"
      _fail(message, USAGE_EXIT)
      raise  # unreachable: _fail exits

  def guarded(args: list[str]) -> None:
    try:
      main(args)
    except INPUT_ERRORS as e:
      if debug:
        raise
      if is_input_error(e):
        _fail(describe(e, argv), INPUT_EXIT)
      _bug(e)

  app.run(guarded, argv=argv, flags_parser=parse)
