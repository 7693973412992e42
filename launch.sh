#!/usr/bin/env bash
# Entry points: tests, local runs, and TPU VM runs (gcloud).
#
#   ./launch.sh test [pytest args]            the test suite (the README's test command)
#   ./launch.sh local CONFIG [flags]          python -m pdl_jax.main --config=CONFIG here
#   ./launch.sh tpu ACTION [--dry-run] [...]  TPU VM: create | setup | run | logs | stop | delete | sweep
#
# TPU settings come from the environment:
#   TPU_NAME (required), ZONE (required), PROJECT (required),
#   ACCELERATOR_TYPE (default v4-8), RUNTIME_VERSION (default tpu-ubuntu2204-base),
#   REPO_DIR (code folder on the workers, default pdl_jax).
#
#   ./launch.sh tpu run CONFIG [main.py flags]   all workers at once (--worker=all)
#   ./launch.sh tpu sweep CONFIG [flags]         the config's alpha sweep, one run after another
#   --dry-run (anywhere after the action) prints the gcloud commands instead of running them.
set -euo pipefail
cd "$(dirname "$0")"

usage() {
  sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

DRY_RUN=0

# Runs a command, or prints it (shell-quoted) with --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    printf '\n'
  else
    "$@"
  fi
}

require_tpu_env() {
  local missing=()
  for var in TPU_NAME ZONE PROJECT; do
    [[ -n "${!var:-}" ]] || missing+=("$var")
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    echo "error: set ${missing[*]} for './launch.sh tpu' (e.g. TPU_NAME=pdl ZONE=us-central2-b PROJECT=my-project)" >&2
    exit 2
  fi
}

# gcloud compute tpus tpu-vm ssh on all workers.
ssh_all() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker=all --command="$1"
}

# The alphas of a config's sweep (and "ce" when it includes a CE point), one a line.
sweep_points() {
  "${PYTHON:-python}" - "$1" <<'EOF'
import importlib.util, sys
path, _, arg = sys.argv[1].partition(":")
spec = importlib.util.spec_from_file_location("sweep_config", path)
module = importlib.util.module_from_spec(spec)
sys.path.insert(0, ".")
spec.loader.exec_module(module)
c = module.get_config(arg or None)
for a in c.sweep.alphas:
  print(f"alpha={a}")
if c.sweep.include_ce:
  print("loss=ce")
EOF
}

tpu() {
  [[ $# -ge 1 ]] || usage
  local action="$1"
  shift
  local args=()
  for a in "$@"; do
    if [[ "$a" == "--dry-run" ]]; then DRY_RUN=1; else args+=("$a"); fi
  done
  require_tpu_env
  local accel="${ACCELERATOR_TYPE:-v4-8}" runtime="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
  local repo="${REPO_DIR:-pdl_jax}"
  case "$action" in
    create)
      run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --accelerator-type="$accel" --version="$runtime"
      ;;
    setup)
      # Copy this checkout (without local venvs and outputs) to every worker, then install.
      local tarball=/tmp/pdl_jax_code.tar.gz
      run tar czf "$tarball" --exclude=.git --exclude=.venv --exclude=.ci/venv \
        --exclude=workdirs .
      run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/pdl_jax_code.tar.gz" \
        --zone="$ZONE" --project="$PROJECT" --worker=all
      ssh_all "mkdir -p $repo && tar xzf /tmp/pdl_jax_code.tar.gz -C $repo && cd $repo && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
      ;;
    run)
      [[ ${#args[@]} -ge 1 ]] || usage
      local config="${args[0]}"
      local flags=("${args[@]:1}")
      ssh_all "cd $repo && .venv/bin/python -m pdl_jax.main --config=$config ${flags[*]:-} 2>&1 | tee -a run.log"
      ;;
    sweep)
      [[ ${#args[@]} -ge 1 ]] || usage
      local config="${args[0]}"
      local flags=("${args[@]:1}")
      local base="${config%%:*}" extra=""
      [[ "$config" == *:* ]] && extra="${config#*:},"
      local name
      name="$(basename "$base" .py)"
      local point
      while read -r point; do
        ssh_all "cd $repo && .venv/bin/python -m pdl_jax.main --config=$base:$extra$point --workdir=workdirs/$name-sweep/${point//=/_} ${flags[*]:-} 2>&1 | tee -a run.log"
      done < <(sweep_points "$config")
      ;;
    logs)
      ssh_all "tail -n 50 $repo/run.log"
      ;;
    stop)
      run gcloud compute tpus tpu-vm stop "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
      ;;
    delete)
      run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
      ;;
    *)
      echo "unknown tpu action '$action'; expected one of: create setup run logs stop delete sweep" >&2
      exit 2
      ;;
  esac
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
case "$cmd" in
  test)
    exec python -m pytest -q "$@"
    ;;
  local)
    [[ $# -ge 1 ]] || usage
    config="$1"
    shift
    exec python -m pdl_jax.main --config="$config" "$@"
    ;;
  tpu)
    tpu "$@"
    ;;
  *)
    echo "unknown command '$cmd'; expected: test, local or tpu" >&2
    usage
    ;;
esac
