"""What several processes of one run (the hosts of a TPU VM pod, or local processes
on CPU) do together: logging from process 0, barriers, host transfer, failures
agreed between processes, exact int64 all-gathers, the check that a folder is
shared by all of them, and the shutdown that ends a completed run."""

from __future__ import annotations

import sys
import uuid

import jax
from jax.experimental import multihost_utils
import numpy as np

from pdl_jax import paths

def log(line: str) -> None:
  """A progress line on stderr, from process 0 only (every process would repeat it)."""
  if jax.process_index() == 0:
    print(line, file=sys.stderr, flush=True)


def shutdown() -> None:
  """Ends a completed multi-process run with jax.distributed's shutdown (itself a
  barrier of all processes, with a timeout), before other exit hooks and the backends'
  teardown; nothing on one process.

  Left to interpreter exit, JAX's own exit hook tears down each process's backend
  (its gloo collectives) before that shutdown barrier, while a peer may still be
  running: process 1 exits right after the loop, process 0 first writes the closing
  summary. CI once saw process 0 of the two-process test end in SIGABRT after a
  completed run; the cause was not reproduced, and this ordering (the one marin's
  levanter adopted for teardown aborts) is a suspected fix that narrows the window,
  not a proven one. A process whose run raised does not call this and reaches the
  barrier through JAX's exit hook, as before."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()


def sync(name: str) -> None:
  """Barrier across processes (a no-op on one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
  """An array as numpy on this process, also when it spans processes.

  A replicated array is read from a local shard; one sharded across processes (e.g.
  decoded tokens, batch-split by the model's activation constraints) is gathered,
  which is a collective: then every process must call this at the same point.
  """
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.sharding.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def replicate(mesh: jax.sharding.Mesh, tree):
  """Host values (the same on every process) as replicated global arrays."""
  rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(rep, np.asarray(x)),
                      tree)


def any_process(flag: bool) -> bool:
  """True if `flag` is true on any process (a collective: every process calls it at
  the same point)."""
  if jax.process_count() == 1:
    return bool(flag)
  return bool(allgather_int64(np.array([int(bool(flag))])).any())


def allgather_int64(values: np.ndarray) -> np.ndarray:
  """[P, ...] int64 values of every process, exact.

  JAX collectives run with x64 off, so an int64 array would come back as int32
  (2**31 + 5 turns negative). Each int64 is sent as its two 32-bit halves and put
  back together here.
  """
  values = np.ascontiguousarray(values, dtype=np.int64)
  if jax.process_count() == 1:
    return values[None]

  halves = values.view(np.int32)  # [..., 2 * n]: low and high words, exact
  gathered = np.asarray(multihost_utils.process_allgather(halves))
  gathered = np.ascontiguousarray(gathered.astype(np.int32))
  return gathered.view(np.int64).reshape((jax.process_count(),) + values.shape)


def together(fn, *args, **kwargs):
  """fn(*args, **kwargs), with its failure agreed between processes: if it raises on
  any process, it raises on every one (its own error, or one naming the process that
  failed), instead of leaving the others waiting at the next collective. A
  collective: every process calls it at the same point."""
  error = None
  try:
    result = fn(*args, **kwargs)
  except Exception as e:  # noqa: BLE001  re-raised below, on every process
    error = e
  if jax.process_count() > 1:
    failed = allgather_int64(np.array([int(error is not None)]))[:, 0]
    if failed.any() and error is None:
      raise RuntimeError(f"processes {np.flatnonzero(failed).tolist()} failed at "
                         f"{getattr(fn, '__name__', fn)}; see their logs.")
  if error is not None:
    raise error
  return result


def check_shared_dir(folder: str, what: str = "workdir") -> None:
  """With several processes: that every process sees the same `folder` (one shared
  storage, e.g. gs://). Process 0 writes a marker with a random name; a process that
  does not see it has a host-local folder, where branches on what a process finds
  there (a checkpoint, the token stats) would split the processes before a
  collective and hang the run. A collective: every process calls it at start.

  Raises:
    ValueError: some process does not see process 0's marker (names the folder).
  """
  if jax.process_count() == 1:
    return
  token = allgather_int64(np.array([uuid.uuid4().int % (1 << 62)]))[0, 0]
  marker = paths.path(folder) / f".shared-check-{int(token):x}"
  def write():
    if jax.process_index() == 0:
      marker.parent.mkdir(parents=True, exist_ok=True)
      marker.write_text("")
  together(write)  # a write that fails (permissions) stops every process
  seen = marker.exists()
  missing = allgather_int64(np.array([0 if seen else 1]))[:, 0]
  sync(f"shared-check read {what}")
  if jax.process_index() == 0:
    marker.unlink(missing_ok=True)
  if missing.any():
    raise ValueError(
        f"{what} {folder!r} is not shared by all {jax.process_count()} processes: "
        f"processes {np.flatnonzero(missing).tolist()} do not see a file process 0 wrote "
        "there. Use storage every host sees (gs://BUCKET/..., or a shared filesystem).")
