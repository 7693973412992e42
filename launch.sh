#!/usr/bin/env bash
# Entry points: tests, local runs, TPU VM runs (gcloud), and the detached job wrapper.
#
#   ./launch.sh test [pytest args]            the test suite (the README's test command)
#   ./launch.sh local CONFIG [flags]          python -m pdl_jax.main --config=CONFIG here
#   ./launch.sh tpu ACTION [--dry-run] [...]  a TPU VM, with gcloud (actions below)
#   ./launch.sh job ACTION NAME [...]         a detached, self-resuming job on this machine
#
# tpu actions (--dry-run anywhere after the action prints the gcloud commands instead):
#   create | recreate | setup | stop | delete   the VM; recreate = delete, create, setup and
#                                  start its last run/sweep again (RESTART=0: not that)
#   run CONFIG --workdir=DIR [flags]   python -m pdl_jax.main on all workers, detached
#   sweep CONFIG [sweep.py flags]      experiments/sweep.py --root=$WORKDIR_ROOT/<config name>
#   status | logs [-f] | kill          the job on the workers (kill: SIGTERM, then SIGKILL)
# TPU settings come from the environment: TPU_NAME, ZONE, PROJECT (required);
#   ACCELERATOR_TYPE (default v4-8); RUNTIME_VERSION (default from the accelerator: v4
#   tpu-ubuntu2204-base, v5litepod/v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e
#   v2-alpha-tpuv6e); SPOT=1 (spot VM); QUEUED=1 (a queued resource named TPU_NAME);
#   REPO_DIR (code folder on the workers, default pdl_jax); JOB (job name, default run);
#   WORKDIR_ROOT (shared root of sweeps, e.g. gs://BUCKET/sweeps; required for sweep).
#
# job actions (what tpu run/sweep/status/logs/kill run on each worker; files in jobs/NAME/):
#   start NAME [--dry-run] -- CMD...   runs CMD detached (setsid, nohup) and returns;
#              reruns it when it exits 143 (SIGTERM: preemption) or the machine restarted
#              (@reboot crontab entry), at most MAX_RETRIES times (default 20); refused
#              while the job runs
#   status NAME | logs NAME [-n N] [-f] [--prefix] | kill NAME (SIGKILL after KILL_GRACE s)
#   reboot     restarts every job still "running" (what the @reboot entry runs)
set -euo pipefail
cd "$(dirname "$0")"
SELF="$PWD/$(basename "$0")"

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0" >&2
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

# ---------------------------------------------------------------------------
# job: a command run detached from the terminal, rerun after preemption.
#
# Files in $JOBS_DIR/NAME/ (JOBS_DIR defaults to jobs/ in the repo folder):
#   cmd      the command, shell-quoted on one line (what every attempt runs)
#   state    running | stopping | finished | failed | killed | gave-up
#   pid      the wrapper's pid (its own session: setsid); child: the command's pid (and
#            process group); exit: the last attempt's exit status; retries: reruns so far
#   log      the command's output and the wrapper's lines, appended across attempts
#   env      the environment of `job start` (restored for a rerun after a restart)
#   lock     held (flock) while the wrapper runs: the "already running" check
# A @reboot crontab entry (installed by `job start`; JOB_REBOOT_HOOK=0 skips it) runs
# `job reboot`, which restarts every job whose state is still "running".

# Set on this machine, these go to the workers with `tpu run|sweep|kill` too.
FORWARD=()
for var in MAX_RETRIES RETRY_DELAY KILL_GRACE; do
  [[ -z "${!var:-}" ]] || FORWARD+=("$var=${!var}")
done
JOBS_DIR="${JOBS_DIR:-jobs}"
MAX_RETRIES="${MAX_RETRIES:-20}"
RETRY_DELAY="${RETRY_DELAY:-10}"
KILL_GRACE="${KILL_GRACE:-300}"

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

job_log() {  # DIR MESSAGE: a wrapper line in the job's log
  printf '[launch.sh job %s %s] %s\n' "$(basename "$1")" "$(now)" "$2" >>"$1/log"
}

job_running() {  # DIR: true while a wrapper holds the job's lock
  [[ -f "$1/lock" ]] && ! flock -n "$1/lock" true
}

group_alive() {  # PGID
  [[ "$1" =~ ^[0-9]+$ && "$1" != 0 ]] && kill -0 -- "-$1" 2>/dev/null
}

boot_id() { cat /proc/sys/kernel/random/boot_id 2>/dev/null || echo unknown; }

# The command's process group while some of it still runs (written by the wrapper with
# the boot it belongs to: after a restart the number means nothing), else nothing.
job_child() {  # DIR
  local pgid boot
  read -r pgid boot 2>/dev/null <"$1/child" || return 0
  [[ "$boot" == "$(boot_id)" ]] && group_alive "$pgid" && echo "$pgid"
  return 0
}

# The exit status that means "preempted, run again": 143 (the run saved a checkpoint on
# SIGTERM, or was killed by it before its handler was set; sweep.py exits with the
# status of a point that exited so).
job_preempted() {  # RC
  [[ "$1" == 143 ]]
}

# Starts the wrapper loop detached: own session (no SIGHUP from ssh), output to the log,
# stdin from /dev/null (ssh returns at once). Inherits fd 9, the lock, from the caller.
job_launch() {  # NAME REASON
  local dir="$JOBS_DIR/$1" i
  rm -f "$dir/pid"
  if command -v setsid >/dev/null; then
    nohup setsid "$SELF" job _loop "$1" "$2" >>"$dir/log" 2>&1 </dev/null &
  else
    nohup "$SELF" job _loop "$1" "$2" >>"$dir/log" 2>&1 </dev/null &
  fi
  for i in $(seq 100); do
    [[ -s "$dir/pid" ]] && return 0
    sleep 0.1
  done
  echo "error: the wrapper of job $1 did not start; see $dir/log" >&2
  exit 1
}

job_install_reboot_hook() {
  [[ "${JOB_REBOOT_HOOK:-1}" == 1 ]] || return 0
  if ! command -v crontab >/dev/null; then
    echo "warning: no crontab here: after a restart of this machine, start the job again" >&2
    return 0
  fi
  local jobs_abs marker line current
  jobs_abs="$(cd "$JOBS_DIR" && pwd -P)"
  marker="# pdl_jax launch.sh job reboot: $jobs_abs"
  line="@reboot sleep ${REBOOT_DELAY:-30}; cd $(printf %q "$PWD") && JOBS_DIR=$(printf %q "$jobs_abs") ./launch.sh job reboot >>$(printf %q "$jobs_abs/reboot.log") 2>&1 $marker"
  current="$(crontab -l 2>/dev/null || true)"
  grep -qxF "$line" <<<"$current" && return 0
  { grep -vF "$marker" <<<"$current" | grep -v '^$' || true; echo "$line"; } | crontab -
}

job_start() {  # NAME [--dry-run] -- CMD...
  local name="$1" dir="$JOBS_DIR/$1"
  shift
  [[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1 && shift
  [[ "${1:-}" == "--" ]] && shift
  [[ $# -ge 1 ]] || usage
  if [[ "$DRY_RUN" == 1 ]]; then
    # What would run: the detached wrapper, then each attempt of the command.
    echo "# wrapper (pid in $dir/pid, output in $dir/log, lock $dir/lock):"
    printf '%q ' nohup setsid "$SELF" job _loop "$name" start
    printf '>>%q 2>&1 </dev/null &\n' "$dir/log"
    echo "# each attempt (pid in $dir/child); rerun on exit 143 or after a restart, at most MAX_RETRIES=$MAX_RETRIES times, RETRY_DELAY=$RETRY_DELAY s apart:"
    run setsid "$@"
    return 0
  fi
  mkdir -p "$dir"
  exec 9>>"$dir/lock"
  if ! flock -n 9 || [[ -n "$(job_child "$dir")" ]]; then
    echo "$(hostname): job $name is already running (wrapper pid $(cat "$dir/pid" 2>/dev/null)): $(cat "$dir/cmd"); not started again ('./launch.sh job kill $name' stops it)" >&2
    exit 1
  fi
  local cmd
  cmd="$(printf '%q ' "$@")"
  printf '%s\n' "${cmd% }" >"$dir/cmd"
  echo running >"$dir/state"
  echo 0 >"$dir/retries"
  rm -f "$dir/child" "$dir/exit"
  (umask 077 && env -0 >"$dir/env")  # for a rerun after a restart (cron's env is bare)
  touch "$dir/log"
  job_install_reboot_hook
  job_log "$dir" "start on $(hostname): ${cmd% }"
  job_launch "$name" start
  echo "$(hostname): started job $name (wrapper pid $(cat "$dir/pid")); log: $(cd "$dir" && pwd -P)/log"
}

job_reboot() {  # restart every job left "running" (after a restart of the machine)
  local dir
  for dir in "$JOBS_DIR"/*/; do
    dir="${dir%/}"
    [[ -f "$dir/state" && "$(cat "$dir/state")" == running ]] || continue
    (
      exec 9>>"$dir/lock"
      flock -n 9 || exit 0
      job_launch "$(basename "$dir")" reboot
      echo "$(now) restarted job $(basename "$dir")"
    )
  done
}

job_restore_env() {  # FILE: the environment `job start` saw (env -0), over this one
  local kv
  [[ -f "$1" ]] || return 0
  while IFS= read -r -d '' kv; do
    case "${kv%%=*}" in
      PWD | OLDPWD | SHLVL | _ | JOBS_DIR | *[!A-Za-z0-9_]*) ;;
      *) export "${kv?}" 2>/dev/null || true ;;
    esac
  done <"$1"
}

job_loop() {  # NAME REASON (start | reboot): the wrapper, run detached by job_launch
  local name="$1" reason="$2" dir="$JOBS_DIR/$1"
  local argv=() child=0 stop=0 rc retries i
  flock -n 9 2>/dev/null || { exec 9>>"$dir/lock" && flock -n 9; } || {
    echo "job $name: another wrapper holds $dir/lock" >&2
    exit 1
  }
  eval "argv=($(cat "$dir/cmd"))"
  trap '' HUP
  # SIGTERM/SIGINT to the wrapper (job kill, or the machine shutting down): pass it to
  # the command's process group (the run saves a checkpoint), then stop without rerunning.
  trap 'stop=1; if [[ $child != 0 ]]; then kill -TERM -- "-$child" 2>/dev/null || kill -TERM "$child" 2>/dev/null || true; fi' TERM INT
  echo "$$" >"$dir/pid"
  retries="$(cat "$dir/retries")"
  if [[ "$reason" == reboot ]]; then
    job_restore_env "$dir/env"
    retries=$((retries + 1))
    echo "$retries" >"$dir/retries"
    job_log "$dir" "the machine restarted while the job ran; rerunning (retry $retries/$MAX_RETRIES)"
  fi
  while :; do
    if ((retries > MAX_RETRIES)); then
      echo gave-up >"$dir/state"
      job_log "$dir" "gave up: $MAX_RETRIES retries used (MAX_RETRIES); start it again to go on"
      exit 1
    fi
    [[ "$(cat "$dir/state")" == stopping ]] && stop=1
    ((stop == 0)) || break
    job_log "$dir" "attempt $((retries + 1)): $(cat "$dir/cmd")"
    if command -v setsid >/dev/null; then
      setsid "${argv[@]}" 9>&- </dev/null &
    else
      "${argv[@]}" 9>&- </dev/null &
    fi
    child=$!
    echo "$child $(boot_id)" >"$dir/child"
    # wait returns early when a trapped signal arrives: wait again while the child lives
    # (a zombie counts: the next wait collects its status).
    wait "$child" && rc=0 || rc=$?
    while kill -0 "$child" 2>/dev/null; do
      wait "$child" && rc=0 || rc=$?
    done
    # Whatever the command left in its process group (a sweep point after sweep.py
    # died of SIGTERM) finishes too before anything else runs; SIGKILL after KILL_GRACE.
    for ((i = 0; i < KILL_GRACE; i++)); do
      group_alive "$child" || break
      sleep 1
    done
    if group_alive "$child"; then
      job_log "$dir" "processes of the command still ran after $KILL_GRACE s: SIGKILL"
      kill -KILL -- "-$child" 2>/dev/null || true
    fi
    child=0
    rm -f "$dir/child"
    echo "$rc" >"$dir/exit"
    ((stop == 0)) || break
    if [[ "$rc" == 0 ]]; then
      echo finished >"$dir/state"
      job_log "$dir" "finished (exit 0)"
      exit 0
    fi
    if ! job_preempted "$rc"; then
      echo failed >"$dir/state"
      job_log "$dir" "failed: exit $rc; not rerun (only a preemption, exit 143, is)"
      exit "$rc"
    fi
    retries=$((retries + 1))
    echo "$retries" >"$dir/retries"
    if ((retries <= MAX_RETRIES)); then
      job_log "$dir" "exit $rc (preempted: SIGTERM); rerunning in $RETRY_DELAY s (retry $retries/$MAX_RETRIES)"
      sleep "$RETRY_DELAY" &
      wait $! || kill $! 2>/dev/null || true
    fi
  done
  # Stopped by a signal.
  if [[ "$(cat "$dir/state")" == stopping ]]; then
    echo killed >"$dir/state"
    job_log "$dir" "stopped by 'job kill' (last exit ${rc:-none}); not rerun"
    exit 0
  fi
  job_log "$dir" "the wrapper got SIGTERM (machine shutting down?; last exit ${rc:-none}); state stays 'running': the @reboot entry or 'job start' runs it again"
  exit 143
}

job_status() {  # NAME: one line
  local name="$1" dir="$JOBS_DIR/$1" state line progress="" point
  if [[ ! -f "$dir/state" ]]; then
    echo "$(hostname): no job $name"
    return 0
  fi
  state="$(cat "$dir/state")"
  if job_running "$dir"; then
    [[ "$state" == stopping ]] || state="running"
    state+=" (wrapper pid $(cat "$dir/pid" 2>/dev/null), $(cat "$dir/retries") reruns)"
  elif [[ "$state" == running ]]; then
    state="interrupted: no wrapper runs (machine restarted before the @reboot entry ran, or the wrapper was killed); 'job start' or 'job reboot' reruns it"
  elif [[ -f "$dir/exit" ]]; then
    state+=" (exit $(cat "$dir/exit"))"
  fi
  line="$(grep -E '^step [0-9]+/[0-9]+ ' "$dir/log" | tail -n 1 || true)"
  if [[ -n "$line" ]]; then
    progress="$(grep -oE '^step [0-9]+/[0-9]+' <<<"$line")"
    if grep -qE 'eta [0-9.]+ min' <<<"$line"; then
      progress+=", $(grep -oE 'eta [0-9.]+ min' <<<"$line")"
    fi
  fi
  point="$(grep -oE '^\[[0-9]+/[0-9]+\]' "$dir/log" | tail -n 1 || true)"
  [[ -z "$point" ]] || progress="sweep point ${point//[][]/}${progress:+, $progress}"
  echo "$(hostname): job $name $state; ${progress:-no step logged yet (only process 0 logs steps)}"
}

job_logs() {  # NAME [-n N] [-f] [--prefix]
  local name="$1" dir="$JOBS_DIR/$1" lines=50 follow=() prefix=0
  shift
  while [[ $# -gt 0 ]]; do
    case "$1" in
      -n) lines="$2"; shift ;;
      -f) follow=(-f) ;;
      --prefix) prefix=1 ;;
      *) usage ;;
    esac
    shift
  done
  if [[ ! -f "$dir/log" ]]; then
    echo "$(hostname): no job $name"
    return 0
  fi
  if [[ "$prefix" == 1 ]]; then
    tail -n "$lines" "${follow[@]}" "$dir/log" | sed -u "s/^/$(hostname): /"
  else
    tail -n "$lines" "${follow[@]}" "$dir/log"
  fi
}

job_kill() {  # NAME: SIGTERM to the wrapper (it passes it on), SIGKILL after KILL_GRACE s
  local name="$1" dir="$JOBS_DIR/$1" i pid child
  if [[ ! -f "$dir/state" ]]; then
    echo "$(hostname): no job $name"
    return 0
  fi
  child="$(job_child "$dir")"
  if ! job_running "$dir"; then
    if [[ "$(cat "$dir/state")" == running ]]; then
      echo killed >"$dir/state"  # so that no @reboot entry restarts it
      job_log "$dir" "killed while not running (was interrupted); not rerun"
    fi
    if [[ -n "$child" ]]; then kill -TERM -- "-$child" 2>/dev/null || true; fi
    echo "$(hostname): job $name is not running ($(cat "$dir/state"))"
    return 0
  fi
  echo stopping >"$dir/state"
  pid="$(cat "$dir/pid")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < KILL_GRACE * 2; i++)); do
    job_running "$dir" || break
    sleep 0.5
  done
  if job_running "$dir"; then
    child="$(job_child "$dir")"
    if [[ -n "$child" ]]; then kill -KILL -- "-$child" 2>/dev/null || true; fi
    kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true
    echo killed >"$dir/state"
    job_log "$dir" "SIGKILL: still running $KILL_GRACE s after SIGTERM (KILL_GRACE)"
  fi
  echo "$(hostname): job $name stopped ($(cat "$dir/state"), last exit $(cat "$dir/exit" 2>/dev/null || echo none))"
}

job() {
  [[ $# -ge 1 ]] || usage
  local action="$1"
  shift
  [[ "$action" == reboot || $# -ge 1 ]] || usage
  [[ "$action" == reboot || "$1" =~ ^[A-Za-z0-9_.-]+$ ]] || {
    echo "error: job name '$1': letters, digits, . _ - only" >&2
    exit 2
  }
  case "$action" in
    start) job_start "$@" ;;
    status) job_status "$1" ;;
    logs) job_logs "$@" ;;
    kill) job_kill "$1" ;;
    reboot) job_reboot ;;
    _loop) job_loop "$@" ;;
    *)
      echo "unknown job action '$action'; expected one of: start status logs kill reboot" >&2
      exit 2
      ;;
  esac
}

# ---------------------------------------------------------------------------
# tpu: gcloud.

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

# The TPU software version for an accelerator type (RUNTIME_VERSION overrides).
runtime_version() {
  if [[ -n "${RUNTIME_VERSION:-}" ]]; then
    echo "$RUNTIME_VERSION"
    return
  fi
  case "$1" in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *)
      echo "error: no default runtime version for ACCELERATOR_TYPE=$1; set RUNTIME_VERSION" >&2
      exit 2
      ;;
  esac
}

# gcloud compute tpus tpu-vm ssh on WORKERS (all, 0, ...) running COMMAND there.
ssh_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
    --worker="$1" --command="$2"
}

# The command line, for a worker, that runs ./launch.sh ARGS... in the repo folder there
# (with MAX_RETRIES, RETRY_DELAY, KILL_GRACE when set here).
remote_launch() {
  local args env=""
  args="$(printf '%q ' "$@")"
  [[ ${#FORWARD[@]} == 0 ]] || env="env $(printf '%q ' "${FORWARD[@]}")"
  printf 'cd %q && %s./launch.sh %s' "$REPO" "$env" "${args% }"
}

# Where `tpu run`/`tpu sweep` remember the last job they started, for `tpu recreate`.
last_job_file() {
  local dir="${LAUNCH_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/pdl_jax}"
  printf '%s/%s-%s-%s.job' "$dir" "$PROJECT" "$ZONE" "$TPU_NAME"
}

# Starts a job on all workers and remembers its command for `tpu recreate`.
start_job() {
  local command
  command="$(remote_launch job start "$JOB" -- "$@")"
  ssh_workers all "$command"
  if [[ "$DRY_RUN" == 0 ]]; then
    mkdir -p "$(dirname "$(last_job_file)")"
    printf '%s\n' "$command" >"$(last_job_file)"
    echo "started detached on every worker; follow it with ./launch.sh tpu logs -f | status | kill"
  fi
}

create_vm() {
  local spot=()
  [[ "${SPOT:-0}" == 1 ]] && spot=(--spot)
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources create "$TPU_NAME" --node-id="$TPU_NAME" \
      --zone="$ZONE" --project="$PROJECT" --accelerator-type="$ACCEL" \
      --runtime-version="$RUNTIME" "${spot[@]}"
    wait_active
  else
    run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
      --accelerator-type="$ACCEL" --version="$RUNTIME" "${spot[@]}"
  fi
}

# Waits until the queued resource is ACTIVE (its VM exists), polling every 30 s.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE"
    --project="$PROJECT" --format=value\(state.state\))
  if [[ "$DRY_RUN" == 1 ]]; then
    run "${describe[@]}"
    return
  fi
  local state="" previous=""
  while :; do
    state="$("${describe[@]}")"
    [[ "$state" == "$previous" ]] || echo "$(now) queued resource $TPU_NAME: $state"
    previous="$state"
    case "$state" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING)
        echo "error: queued resource $TPU_NAME is $state" >&2
        exit 1
        ;;
    esac
    sleep 30
  done
}

delete_vm() {
  if [[ "${QUEUED:-0}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$TPU_NAME" --zone="$ZONE" \
      --project="$PROJECT" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" --quiet
  fi
}

setup_vm() {
  # Copy this checkout (without local venvs, outputs and jobs) to every worker, install.
  local tarball=/tmp/pdl_jax_code.tar.gz
  run tar czf "$tarball" --exclude=.git --exclude=.venv --exclude=.ci/venv \
    --exclude=workdirs --exclude=./jobs .
  run gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:/tmp/pdl_jax_code.tar.gz" \
    --zone="$ZONE" --project="$PROJECT" --worker=all
  ssh_workers all "mkdir -p $REPO && tar xzf /tmp/pdl_jax_code.tar.gz -C $REPO && cd $REPO && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
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
  ACCEL="${ACCELERATOR_TYPE:-v4-8}"
  REPO="${REPO_DIR:-pdl_jax}"
  JOB="${JOB:-run}"
  local python=.venv/bin/python
  case "$action" in
    create)
      RUNTIME="$(runtime_version "$ACCEL")"
      create_vm
      ;;
    recreate)
      # A preempted spot VM (or queued resource) is deleted and made again, same settings.
      RUNTIME="$(runtime_version "$ACCEL")"
      delete_vm || echo "(nothing to delete, or the delete failed: creating anyway)" >&2
      create_vm
      setup_vm
      if [[ "${RESTART:-1}" == 1 && -f "$(last_job_file)" ]]; then
        echo "restarting the last job started on $TPU_NAME (it resumes from its workdir)" >&2
        ssh_workers all "$(cat "$(last_job_file)")"
      fi
      ;;
    setup)
      setup_vm
      ;;
    run)
      [[ ${#args[@]} -ge 1 ]] || usage
      local config="${args[0]}"
      local flags=("${args[@]:1}")
      if [[ ! " ${flags[*]} " =~ \ --workdir[=\ ] ]]; then
        echo "error: 'tpu run' needs --workdir=DIR (gs://BUCKET/...: shared by the workers, kept when the VM is not): reruns after preemption resume from it" >&2
        exit 2
      fi
      start_job "$python" -m pdl_jax.main --config="$config" "${flags[@]}"
      ;;
    sweep)
      [[ ${#args[@]} -ge 1 ]] || usage
      if [[ -z "${WORKDIR_ROOT:-}" ]]; then
        echo "error: set WORKDIR_ROOT (e.g. gs://BUCKET/sweeps) for 'tpu sweep': the sweep's runs go to \$WORKDIR_ROOT/<config name>" >&2
        exit 2
      fi
      local config="${args[0]}"
      local flags=("${args[@]:1}")
      local name
      name="$(basename "${config%%:*}" .py)"
      start_job "$python" experiments/sweep.py --config="$config" \
        --root="${WORKDIR_ROOT%/}/$name" "${flags[@]}"
      ;;
    status)
      if [[ "${QUEUED:-0}" == 1 ]]; then
        run gcloud compute tpus queued-resources describe "$TPU_NAME" --zone="$ZONE" \
          --project="$PROJECT" --format=value\(state.state\)
      fi
      run gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone="$ZONE" --project="$PROJECT" \
        --format=value\(state\)
      ssh_workers all "$(remote_launch job status "$JOB")"
      ;;
    logs)
      # The last lines of every worker (only process 0 logs steps), then worker 0's log.
      local follow=()
      [[ " ${args[*]:-} " == *" -f "* ]] && follow=(-f)
      ssh_workers all "$(remote_launch job logs "$JOB" -n 3 --prefix)"
      ssh_workers 0 "$(remote_launch job logs "$JOB" -n "${LOG_LINES:-50}" "${follow[@]}")"
      ;;
    kill)
      ssh_workers all "$(remote_launch job kill "$JOB")"
      [[ "$DRY_RUN" == 1 ]] || rm -f "$(last_job_file)"
      ;;
    stop)
      run gcloud compute tpus tpu-vm stop "$TPU_NAME" --zone="$ZONE" --project="$PROJECT"
      ;;
    delete)
      delete_vm
      ;;
    *)
      echo "unknown tpu action '$action'; expected one of: create recreate setup run sweep status logs kill stop delete" >&2
      exit 2
      ;;
  esac
}

[[ $# -ge 1 ]] || usage
cmd="$1"
shift
case "$cmd" in
  test)
    exec python -m pytest -q -n 2 "$@"
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
  job)
    job "$@"
    ;;
  *)
    echo "unknown command '$cmd'; expected: test, local, tpu or job" >&2
    usage
    ;;
esac
