"""launch.sh: shellcheck-clean, and the gcloud commands it prints with --dry-run."""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU_ENV = {"TPU_NAME": "pdl-v4", "ZONE": "us-central2-b", "PROJECT": "my-proj",
           "ACCELERATOR_TYPE": "v4-16"}


def launch(*args, extra_env=None):
  env = dict(os.environ, **(extra_env or {}))
  # The venv's python runs the sweep expansion.
  env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
  return subprocess.run([os.path.join(ROOT, "launch.sh"), *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=120)


def test_shellcheck_passes():
  exe = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                   "shellcheck")
  assert os.path.exists(exe), "shellcheck missing: pip install -r requirements.txt"
  done = subprocess.run([exe, os.path.join(ROOT, "launch.sh")], capture_output=True,
                        text=True)
  assert done.returncode == 0, done.stdout


def test_tpu_dry_run_commands():
  out = launch("tpu", "create", "--dry-run", extra_env=TPU_ENV)
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "pdl-v4", "--zone=us-central2-b",
      "--project=my-proj", "--accelerator-type=v4-16", "--version=tpu-ubuntu2204-base"]
  out = launch("tpu", "run", "configs/dialogue.py:alpha=0.25", "--workdir=gs://b/w",
               "--dry-run", extra_env=TPU_ENV)
  assert out.returncode == 0, out.stderr
  line = out.stdout.strip()
  assert line.startswith("gcloud compute tpus tpu-vm ssh pdl-v4 --zone=us-central2-b "
                         "--project=my-proj --worker=all --command=")
  assert "python\\ -m\\ pdl_jax.main\\ --config=configs/dialogue.py:alpha=0.25" in line
  assert "--workdir=gs://b/w" in line
  for action, words in (("stop", "tpu-vm stop pdl-v4"), ("delete", "tpu-vm delete pdl-v4"),
                        ("logs", "--worker=all"), ("setup", "tpu-vm scp")):
    out = launch("tpu", action, "--dry-run", extra_env=TPU_ENV)
    assert out.returncode == 0 and words in out.stdout, (action, out.stdout, out.stderr)


def test_tpu_sweep_runs_the_config_sweep_in_turn():
  out = launch("tpu", "sweep", "configs/dialogue.py", "--dry-run", extra_env=TPU_ENV)
  assert out.returncode == 0, out.stderr
  lines = out.stdout.strip().splitlines()
  assert len(lines) == 5  # alphas 0, 0.25, 0.5, 1.0 and the CE point
  assert "--config=configs/dialogue.py:alpha=0.25" in lines[1].replace("\\", "")
  assert "--workdir=workdirs/dialogue-sweep/loss_ce" in lines[-1].replace("\\", "")


@pytest.mark.parametrize("args, env, message", [
    (("tpu", "create", "--dry-run"), {}, "set TPU_NAME ZONE PROJECT"),
    (("tpu", "explode", "--dry-run"), TPU_ENV, "unknown tpu action 'explode'"),
    (("fly",), {}, "unknown command 'fly'"),
])
def test_errors(args, env, message):
  clean = {k: "" for k in TPU_ENV}
  out = launch(*args, extra_env={**clean, **env})
  assert out.returncode == 2 and message in out.stderr
