#!/usr/bin/env bash
# Entry points: tests and local runs. TPU VM commands come with the multi-host work.
#   ./launch.sh test            run the test suite (the README's test command)
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  echo "usage: $0 test" >&2
  exit 2
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
case "$cmd" in
  test)
    exec python -m pytest -q "$@"
    ;;
  *)
    echo "unknown command '$cmd'; expected: test" >&2
    usage
    ;;
esac
