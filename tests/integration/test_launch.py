"""launch.sh: shellcheck-clean; the gcloud commands it prints with --dry-run; and the job
wrapper that `tpu run`/`tpu sweep` start on every worker, run here for real (detached
start, rerun after SIGTERM/143, bounded retries, kill, restart after a reboot), ending with
a smoke training run that is preempted mid-run and finishes like an uninterrupted one.
"""

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

# The tests/ folder (this file is 1 level below it) and the repository.
TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(TESTS)
TPU_ENV = {"TPU_NAME": "pdl-v4", "ZONE": "us-central2-b", "PROJECT": "my-proj",
           "ACCELERATOR_TYPE": "v4-16"}
GCLOUD = ["gcloud", "compute", "tpus"]
WHERE = ["--zone=us-central2-b", "--project=my-proj"]
SSH = [*GCLOUD, "tpu-vm", "ssh", "pdl-v4", *WHERE]


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
  """No test touches the real crontab, ~/.local/state or the repo's jobs/."""
  monkeypatch.setenv("LAUNCH_STATE_DIR", str(tmp_path / "state"))
  monkeypatch.setenv("JOBS_DIR", str(tmp_path / "jobs"))
  monkeypatch.setenv("JOB_REBOOT_HOOK", "0")
  monkeypatch.setenv("RETRY_DELAY", "0")
  for var in ("SPOT", "QUEUED", "RUNTIME_VERSION", "WORKDIR_ROOT", "JOB", "REPO_DIR",
              "MAX_RETRIES", "KILL_GRACE", "RESTART"):
    monkeypatch.delenv(var, raising=False)
  yield
  # A test that failed half-way leaves no detached job running.
  jobs = tmp_path / "jobs"
  for name in (os.listdir(jobs) if jobs.is_dir() else []):
    if job_alive(tmp_path, name):
      launch("job", "kill", name, extra_env={"KILL_GRACE": "10"})


def launch(*args, extra_env=None, timeout=120):
  env = dict(os.environ, **(extra_env or {}))
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return subprocess.run([os.path.join(ROOT, "launch.sh"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=timeout)


def dry(*args, **env):
  """The commands `launch.sh ... --dry-run` prints, each split into its words."""
  unset = {"RETRY_DELAY": "", "MAX_RETRIES": "", "KILL_GRACE": ""}  # not passed on
  out = launch(*args, "--dry-run", extra_env={**TPU_ENV, **unset, **env})
  assert out.returncode == 0, out.stderr
  return [shlex.split(line) for line in out.stdout.strip().splitlines()]


def remote(words):
  """An ssh command's --command, split: the argv run on the worker."""
  (command,) = [w for w in words if w.startswith("--command=")]
  return shlex.split(command.removeprefix("--command="))


def test_shellcheck_passes():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                   "shellcheck")
  assert os.path.exists(exe), "shellcheck missing: pip install -r requirements.txt"
  done = subprocess.run([exe, os.path.join(ROOT, "launch.sh")], capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stdout


# ---------------------------------------------------------------------------
# tpu: the gcloud commands.

@pytest.mark.parametrize("accel, runtime", [
    ("v4-16", "tpu-ubuntu2204-base"), ("v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v5e-8", "v2-alpha-tpuv5-lite"), ("v5p-8", "v2-alpha-tpuv5"), ("v6e-8", "v2-alpha-tpuv6e"),
])
def test_create_picks_the_runtime_of_the_accelerator(accel, runtime):
  assert dry("tpu", "create", ACCELERATOR_TYPE=accel) == [
      [*GCLOUD, "tpu-vm", "create", "pdl-v4", *WHERE, f"--accelerator-type={accel}",
       f"--version={runtime}"]]


def test_create_spot_queued_and_runtime_override():
  assert dry("tpu", "create", SPOT="1", RUNTIME_VERSION="my-rt") == [
      [*GCLOUD, "tpu-vm", "create", "pdl-v4", *WHERE, "--accelerator-type=v4-16",
       "--version=my-rt", "--spot"]]
  assert dry("tpu", "create", SPOT="1", QUEUED="1", ACCELERATOR_TYPE="v6e-8") == [
      [*GCLOUD, "queued-resources", "create", "pdl-v4", "--node-id=pdl-v4", *WHERE,
       "--accelerator-type=v6e-8", "--runtime-version=v2-alpha-tpuv6e", "--spot"],
      # then waits until the queued resource is ACTIVE
      [*GCLOUD, "queued-resources", "describe", "pdl-v4", *WHERE,
       "--format=value(state.state)"]]
  out = launch("tpu", "create", "--dry-run", extra_env={**TPU_ENV, "ACCELERATOR_TYPE": "v9-8"})
  assert out.returncode == 2 and "set RUNTIME_VERSION" in out.stderr


def test_run_starts_the_job_wrapper_detached_on_every_worker(tmp_path):
  (cmd,) = dry("tpu", "run", "configs/dialogue.py:alpha=0.25", "--workdir=gs://b/w",
               "--config.num_steps=5")
  assert cmd[:len(SSH)] == SSH and cmd[len(SSH)] == "--worker=all"
  assert remote(cmd) == [
      "cd", "pdl_jax", "&&", "./launch.sh", "job", "start", "run", "--",
      ".venv/bin/python", "-m", "pdl_jax.main", "--config=configs/dialogue.py:alpha=0.25",
      "--workdir=gs://b/w", "--config.num_steps=5"]
  (cmd,) = dry("tpu", "run", "configs/dialogue.py", "--workdir", "gs://b/x", JOB="pre",
               REPO_DIR="code dir")
  assert remote(cmd)[:8] == ["cd", "code dir", "&&", "./launch.sh", "job", "start", "pre", "--"]
  # Without a fixed workdir a rerun would start afresh in a new default one.
  out = launch("tpu", "run", "configs/dialogue.py", "--dry-run", extra_env=TPU_ENV)
  assert out.returncode == 2 and "needs --workdir" in out.stderr
  assert not (tmp_path / "state").exists()  # --dry-run remembers nothing


def test_what_run_starts_on_a_worker(tmp_path):
  # The worker side of `tpu run`, with --dry-run: the detached wrapper, its files, the
  # command of every attempt and the retry bound.
  (cmd,) = dry("tpu", "run", "configs/dialogue.py", "--workdir=gs://b/w")
  argv = remote(cmd)
  assert argv[3:8] == ["./launch.sh", "job", "start", "run", "--"]
  out = launch("job", "start", "run", "--dry-run", *argv[7:])
  assert out.returncode == 0, out.stderr
  jobs = tmp_path / "jobs" / "run"
  assert out.stdout.splitlines() == [
      f"# wrapper (pid in {jobs}/pid, output in {jobs}/log, lock {jobs}/lock):",
      f"nohup setsid {ROOT}/launch.sh job _loop run start >>{jobs}/log 2>&1 </dev/null &",
      f"# each attempt (pid in {jobs}/child); rerun on exit 143 or after a restart, at most "
      "MAX_RETRIES=20 times, RETRY_DELAY=0 s apart:",
      "setsid .venv/bin/python -m pdl_jax.main --config=configs/dialogue.py "
      "--workdir=gs://b/w "]
  assert not jobs.exists()


def test_sweep_runs_sweep_py_on_the_workers():
  out = launch("tpu", "sweep", "configs/dialogue.py", "--dry-run", extra_env=TPU_ENV)
  assert out.returncode == 2 and "set WORKDIR_ROOT" in out.stderr
  (cmd,) = dry("tpu", "sweep", "configs/dialogue.py:init_from=gs://b/pre",
               "--config.eval.num_examples=64", WORKDIR_ROOT="gs://b/sweeps/")
  assert cmd[:len(SSH) + 1] == [*SSH, "--worker=all"]
  argv = remote(cmd)
  assert argv == [
      "cd", "pdl_jax", "&&", "./launch.sh", "job", "start", "run", "--",
      ".venv/bin/python", "experiments/sweep.py", "--config=configs/dialogue.py:init_from=gs://b/pre",
      "--root=gs://b/sweeps/dialogue", "--config.eval.num_examples=64"]
  # The points come from sweep.py itself (launch.sh has no point list of its own).
  assert "sweep_points" not in open(os.path.join(ROOT, "launch.sh")).read()
  printed = subprocess.run([sys.executable, *argv[9:], "--print"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
  assert len(printed) == 24  # (CE + 3 alphas + PDL 0.5 with EOS weight 1 + 7 baselines) x 2 seeds
  assert "--workdir=gs://b/sweeps/dialogue/ce-seed0" in printed[0]
  assert all(l.endswith("--config.eval.num_examples=64") for l in printed)


def test_status_logs_kill_and_the_rest():
  assert dry("tpu", "status") == [
      [*GCLOUD, "tpu-vm", "describe", "pdl-v4", *WHERE, "--format=value(state)"],
      [*SSH, "--worker=all", "--command=cd pdl_jax && ./launch.sh job status run"]]
  assert dry("tpu", "status", QUEUED="1")[0][3:5] == ["queued-resources", "describe"]
  assert dry("tpu", "logs", "-f") == [
      [*SSH, "--worker=all", "--command=cd pdl_jax && ./launch.sh job logs run -n 3 --prefix"],
      [*SSH, "--worker=0", "--command=cd pdl_jax && ./launch.sh job logs run -n 50 -f"]]
  assert dry("tpu", "logs", JOB="s")[1] == [
      *SSH, "--worker=0", "--command=cd pdl_jax && ./launch.sh job logs s -n 50"]
  assert dry("tpu", "kill") == [
      [*SSH, "--worker=all", "--command=cd pdl_jax && ./launch.sh job kill run"]]
  # Wrapper settings given here go along to the workers.
  assert dry("tpu", "kill", KILL_GRACE="60") == [
      [*SSH, "--worker=all", "--command=cd pdl_jax && env KILL_GRACE=60 ./launch.sh job kill run"]]
  (cmd,) = dry("tpu", "run", "c.py", "--workdir=w", MAX_RETRIES="3", RETRY_DELAY="5")
  assert remote(cmd)[:7] == ["cd", "pdl_jax", "&&", "env", "MAX_RETRIES=3", "RETRY_DELAY=5",
                             "./launch.sh"]
  assert dry("tpu", "stop") == [[*GCLOUD, "tpu-vm", "stop", "pdl-v4", *WHERE]]
  assert dry("tpu", "delete") == [[*GCLOUD, "tpu-vm", "delete", "pdl-v4", *WHERE, "--quiet"]]
  assert dry("tpu", "delete", QUEUED="1") == [
      [*GCLOUD, "queued-resources", "delete", "pdl-v4", *WHERE, "--force", "--quiet"]]
  setup = dry("tpu", "setup")
  assert setup[0][:2] == ["tar", "czf"] and "--exclude=./jobs" in setup[0]
  assert setup[1][:5] == [*GCLOUD, "tpu-vm", "scp"]
  assert "pip install" in setup[2][-1]


def test_recreate_deletes_creates_sets_up_and_restarts_the_last_job(tmp_path):
  cmds = dry("tpu", "recreate", SPOT="1")
  assert cmds[0] == [*GCLOUD, "tpu-vm", "delete", "pdl-v4", *WHERE, "--quiet"]
  assert cmds[1] == [*GCLOUD, "tpu-vm", "create", "pdl-v4", *WHERE, "--accelerator-type=v4-16",
                     "--version=tpu-ubuntu2204-base", "--spot"]
  assert [c[:2] for c in cmds[2:]] == [["tar", "czf"], GCLOUD[:2], GCLOUD[:2]]
  assert len(cmds) == 5  # no job started on this VM yet: nothing restarted
  # What `tpu run` remembers (written by a real, not a dry, run) is started again.
  last = tmp_path / "state" / "my-proj-us-central2-b-pdl-v4.job"
  last.parent.mkdir()
  last.write_text("cd pdl_jax && ./launch.sh job start run -- .venv/bin/python -m pdl_jax.main "
                  "--config=c.py --workdir=gs://b/w\n")
  cmds = dry("tpu", "recreate", SPOT="1", QUEUED="1")
  assert cmds[0][3:5] == ["queued-resources", "delete"]
  assert cmds[1][3:5] == ["queued-resources", "create"] and "--spot" in cmds[1]
  assert cmds[-1] == [*SSH, "--worker=all", "--command=" + last.read_text().strip()]
  assert len(dry("tpu", "recreate", RESTART="0")) == 5


@pytest.mark.parametrize("args, env, message", [
    (("tpu", "create", "--dry-run"), {}, "set TPU_NAME ZONE PROJECT"),
    (("tpu", "explode", "--dry-run"), TPU_ENV, "unknown tpu action 'explode'"),
    (("job", "explode", "x"), {}, "unknown job action 'explode'"),
    (("job", "start", "a/b", "--", "true"), {}, "job name 'a/b'"),
    (("fly",), {}, "unknown command 'fly'"),
])
def test_errors(args, env, message):
  clean = {k: "" for k in TPU_ENV}
  out = launch(*args, extra_env={**clean, **env})
  assert out.returncode == 2 and message in out.stderr


# ---------------------------------------------------------------------------
# job: the wrapper itself, with small shell commands.

def job(*args, **env):
  return launch("job", *args, extra_env=env)


def read(tmp_path, name, what):
  return (tmp_path / "jobs" / name / what).read_text()


def wait_for(predicate, timeout=60.0, what=""):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return
    time.sleep(0.1)
  raise AssertionError(f"timed out waiting for {what}")


def wait_state(tmp_path, name, *states, timeout=60.0):
  def done():
    try:
      return read(tmp_path, name, "state").strip() in states and not job_alive(tmp_path, name)
    except FileNotFoundError:
      return False
  wait_for(done, timeout, f"job {name} to reach {states}")
  return read(tmp_path, name, "state").strip()


def job_alive(tmp_path, name):
  lock = tmp_path / "jobs" / name / "lock"
  return lock.exists() and subprocess.run(["flock", "-n", str(lock), "true"]).returncode != 0


def script(tmp_path, body):
  path = tmp_path / "cmd.sh"
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)
  return str(path)


# Exits 143 (as a preempted run) the first PREEMPT times, then 0.
FLAKY = """
n=$(cat "$(dirname "$0")/count" 2>/dev/null || echo 0); echo $((n + 1)) > "$(dirname "$0")/count"
echo "step $((n + 1))/9  loss 1.0  eta 0.5 min"
[[ $n -lt $PREEMPT ]] && exit 143
exit 0
"""


def test_job_reruns_after_143_until_it_finishes(tmp_path):
  out = job("start", "t", "--", script(tmp_path, FLAKY), PREEMPT="2")
  assert out.returncode == 0 and "started job t" in out.stdout, out.stderr
  assert wait_state(tmp_path, "t", "finished", "failed", "gave-up") == "finished"
  log = read(tmp_path, "t", "log")
  assert log.count("(preempted: SIGTERM); rerunning") == 2 and "retry 2/20" in log
  assert log.count("attempt ") == 3 and "finished (exit 0)" in log
  assert read(tmp_path, "t", "retries").strip() == "2"
  status = job("status", "t").stdout
  assert "job t finished (exit 0); step 3/9, eta 0.5 min" in status


def test_job_retries_are_bounded_and_other_failures_not_rerun(tmp_path):
  job("start", "b", "--", script(tmp_path, FLAKY), PREEMPT="99", MAX_RETRIES="2")
  assert wait_state(tmp_path, "b", "finished", "failed", "gave-up") == "gave-up"
  log = read(tmp_path, "b", "log")
  assert log.count("attempt ") == 3 and "gave up: 2 retries used" in log
  job("start", "f", "--", "bash", "-c", "echo boom; exit 3")
  assert wait_state(tmp_path, "f", "finished", "failed", "gave-up") == "failed"
  assert "failed: exit 3; not rerun" in read(tmp_path, "f", "log")
  assert "job f failed (exit 3)" in job("status", "f").stdout


LONG = """
echo "marker $MARKER"
trap 'echo "got SIGTERM: saving"; sleep 0.5; exit 143' TERM
for i in $(seq 600); do echo "step $i/600  loss 1.0  eta 9.9 min"; sleep 0.2 & wait $!; done
"""


def test_job_second_start_refused_and_kill_stops_without_rerun(tmp_path):
  cmd = script(tmp_path, LONG)
  assert job("start", "k", "--", cmd).returncode == 0
  wait_for(lambda: "step 3/600" in read(tmp_path, "k", "log"), what="step 3")
  again = job("start", "k", "--", cmd)
  assert again.returncode == 1 and "already running" in again.stderr
  # Detached: the wrapper leads its own session (no terminal, no SIGHUP from ssh; it
  # ignores one anyway), the command its own process group.
  pid = int(read(tmp_path, "k", "pid"))
  child = int(read(tmp_path, "k", "child").split()[0])
  assert os.getsid(pid) == pid and os.getsid(pid) != os.getsid(0)
  assert os.getpgid(child) == child
  os.kill(pid, signal.SIGHUP)
  time.sleep(0.5)
  assert job_alive(tmp_path, "k") and "rerunning" not in read(tmp_path, "k", "log")
  status = job("status", "k").stdout
  assert "job k running (wrapper pid" in status and "eta 9.9 min" in status
  logs = job("logs", "k", "-n", "2", "--prefix").stdout.splitlines()
  assert len(logs) == 2 and all(": step " in l for l in logs)
  out = job("kill", "k")
  assert out.returncode == 0 and "stopped (killed, last exit 143)" in out.stdout
  assert not job_alive(tmp_path, "k")
  log = read(tmp_path, "k", "log")
  assert "got SIGTERM: saving" in log and "stopped by 'job kill'" in log
  assert "rerunning" not in log
  assert "not running" in job("kill", "k").stdout


def test_job_kill_escalates_to_sigkill(tmp_path):
  cmd = script(tmp_path, "trap '' TERM\nwhile :; do sleep 0.2; done\n")
  job("start", "h", "--", cmd)
  wait_for(lambda: os.path.exists(tmp_path / "jobs" / "h" / "child"), what="the command")
  child = int(read(tmp_path, "h", "child").split()[0])
  out = job("kill", "h", KILL_GRACE="2")
  assert "stopped (killed" in out.stdout
  assert "SIGKILL: still running 2 s after SIGTERM" in read(tmp_path, "h", "log")
  wait_for(lambda: subprocess.run(["kill", "-0", str(child)]).returncode != 0, 10, "SIGKILL")


def test_machine_shutdown_keeps_the_job_for_the_reboot_entry(tmp_path):
  cmd = script(tmp_path, LONG)
  job("start", "r", "--", cmd, MARKER="from-start")
  wait_for(lambda: "step 2/600" in read(tmp_path, "r", "log"), what="step 2")
  # Shutdown: SIGTERM to the wrapper (and everything). It passes it on and stops, but
  # the state stays "running" for the @reboot entry.
  os.kill(int(read(tmp_path, "r", "pid")), signal.SIGTERM)
  wait_for(lambda: not job_alive(tmp_path, "r"), what="the wrapper to stop")
  assert read(tmp_path, "r", "state").strip() == "running"
  assert "got SIGTERM: saving" in read(tmp_path, "r", "log")
  assert "interrupted: no wrapper runs" in job("status", "r").stdout
  out = job("reboot", MARKER="")  # what the @reboot crontab entry runs
  assert out.returncode == 0 and "restarted job r" in out.stdout, out.stderr
  wait_for(lambda: job_alive(tmp_path, "r"), what="the restarted wrapper")
  # The rerun sees the environment of `job start` (cron's is bare).
  wait_for(lambda: read(tmp_path, "r", "log").count("marker from-start") == 2, what="rerun")
  assert "the machine restarted while the job ran; rerunning (retry 1/20)" in read(
      tmp_path, "r", "log")
  assert job("reboot").stdout == ""  # already running: not started twice
  job("kill", "r")
  assert read(tmp_path, "r", "state").strip() == "killed"


def test_start_installs_one_reboot_crontab_entry(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  tab = tmp_path / "crontab.txt"
  tab.write_text("0 * * * * other-job\n")
  (bin_dir / "crontab").write_text(
      f'#!/usr/bin/env bash\nif [[ "$1" == -l ]]; then cat {tab}; else cat > {tab}; fi\n')
  (bin_dir / "crontab").chmod(0o755)
  env = {"JOB_REBOOT_HOOK": "1", "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  for name in ("c1", "c2"):
    assert job("start", name, "--", "true", **env).returncode == 0
  lines = tab.read_text().splitlines()
  jobs = os.path.realpath(tmp_path / "jobs")
  assert lines[0] == "0 * * * * other-job" and len(lines) == 2
  assert lines[1].startswith("@reboot sleep 30; cd ")
  assert f"JOBS_DIR={jobs} ./launch.sh job reboot >>{jobs}/reboot.log 2>&1" in lines[1]


# ---------------------------------------------------------------------------
# End to end: a smoke training run under the wrapper, preempted mid-run.

from test_faults import data_dir, env as subprocess_env, train_lines  # noqa: E402,F401



def smoke(workdir, data):
  return [sys.executable, "-m", "pdl_jax.main", "--config=configs/dialogue.py:smoke",
          f"--workdir={workdir}", f"--config.dataset.data_dir={data}", "--config.mesh.data=1",
          "--config.num_steps=20", "--config.checkpoint_every=5", "--config.eval_every=20",
          "--config.log_every=5", "--config.eval.num_examples=8", "--config.eval.batch_size=8",
          "--config.eval.max_new_tokens=4", "--config.tokenizer.vocab_size=200",
          "--config.dataset.max_train_examples=500"]


def last_eval(workdir):
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return [l for l in lines if any(k.startswith("eval/") for k in l)][-1]


def test_preempted_training_run_resumes_and_matches(data_dir, tmp_path):
  env = {k: v for k, v in subprocess_env().items() if k in ("JAX_PLATFORMS", "XLA_FLAGS",
                                                           "TF_CPP_MIN_LOG_LEVEL")}
  out = job("start", "e2e", "--", *smoke(tmp_path / "run", data_dir), **env)
  assert out.returncode == 0, out.stderr
  # The uninterrupted reference runs meanwhile (the wrapper returned at once).
  ref = tmp_path / "ref"
  ref_log = open(tmp_path / "ref.log", "w")
  reference = subprocess.Popen(smoke(ref, data_dir), cwd=ROOT, env=subprocess_env(),
                               stdout=ref_log, stderr=subprocess.STDOUT)
  try:
    wait_for(lambda: "step 5/20" in read(tmp_path, "e2e", "log"), 240, "step 5")
    again = job("start", "e2e", "--", "true")
    assert again.returncode == 1 and "already running" in again.stderr
    # Preemption: the run itself (not the wrapper) gets SIGTERM, saves and exits 143.
    os.kill(int(read(tmp_path, "e2e", "child").split()[0]), signal.SIGTERM)
    state = wait_state(tmp_path, "e2e", "finished", "failed", "gave-up", timeout=240)
    log = read(tmp_path, "e2e", "log")
    assert state == "finished", log[-3000:]
    assert "SIGTERM: saved a checkpoint at step" in log
    assert "exit 143 (preempted: SIGTERM); rerunning" in log and "resumed from step" in log
    assert reference.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()[-3000:]
    assert train_lines(tmp_path / "run") == train_lines(ref)
    assert last_eval(tmp_path / "run") == last_eval(ref)
  finally:
    if reference.poll() is None:
      reference.kill()
