"""Two local CPU processes with jax.distributed (coordinator on 127.0.0.1, gloo):
the frequency pass and a few train steps equal a single-process run."""

import socket
import subprocess

import jax
import numpy as np

from test_faults import ROOT, command, data_dir, env, params_and_steps  # noqa: F401

from pdl_jax import frequency


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def steps_args():
  return ["--config.num_steps=6", "--config.checkpoint_every=3", "--config.log_every=3",
          "--config.eval_every=6", "--config.mesh.data=-1"]


def test_two_processes_equal_one(data_dir, tmp_path):  # noqa: F811
  one = tmp_path / "one"
  e = env()
  e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # same 2-device mesh
  done = subprocess.run(command(one, data_dir, *steps_args()), cwd=ROOT, env=e,
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]

  two = tmp_path / "two"
  port = free_port()
  procs = [subprocess.Popen(
      command(two, data_dir, *steps_args(), f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  assert "mesh data=2 model=1 on 2 cpu devices" in outs[0]

  # Counts: each process counted its half of the split; the sum equals one pass.
  a = frequency.TokenStats.load(str(one / "checkpoints"))
  b = frequency.TokenStats.load(str(two / "checkpoints"))
  np.testing.assert_array_equal(a.counts, b.counts)
  assert a.num_examples == b.num_examples
  # Params: the same global batches, the same result.
  (s1, p1), (s2, p2) = params_and_steps(one), params_and_steps(two)
  assert s1 == s2 == 6
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
