"""The loss weights of a run from its token stats, stored beside the checkpoints.

WORKDIR/checkpoints/loss_weights.npz holds the exact float32 weights_V the run
trains with, the settings that made them, and the checksums of both; a resumed run
refuses weights that no longer match its config. The math is
pdl_jax.losses.pdl.power_law_weights (and the registry's weight functions for the
baselines).
"""

from __future__ import annotations

from typing import Any, Mapping
import numpy as np
from pdl_jax import multihost
from pdl_jax import paths
from pdl_jax.losses import registry
from pdl_jax.data import token_stats


WEIGHTS_FILENAME = "loss_weights.npz"


def loss_weights(loss_cfg, stats: token_stats.TokenStats, eos_id: int) -> np.ndarray:
  """float32 weights [V] of the loss settings' loss (config.loss) from the token
  stats (the loss spec's function of the counts; registry.static_weights), EOS's
  fixed by loss.eos_weight."""
  return registry.static_weights(registry.weight_settings(loss_cfg), stats, eos_id)


def save_weights(path: str, weights_V: np.ndarray, settings: Mapping[str, Any],
                 stats: token_stats.TokenStats) -> str:
  """Writes the weights, their settings and checksums (weights and counts) atomically."""
  path = token_stats.in_folder(path, WEIGHTS_FILENAME)
  weights_V = np.asarray(weights_V, np.float32)
  token_stats.save_npz(path, "weights", weights_V, {
      "settings": dict(settings), "weights_sha256": token_stats.sha256_of(weights_V),
      "counts_sha256": stats.metadata()["counts_sha256"],
      "vocab_size": int(weights_V.shape[0])})
  return path


def load_weights(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(weights_V float32, metadata) written by save_weights; the checksum is verified.

  Raises:
    FileNotFoundError: nothing at path.
    ValueError: truncated file or a checksum that does not match.
  """
  path = token_stats.in_folder(path, WEIGHTS_FILENAME)
  weights_V, meta = token_stats.load_npz(path, "weights", "loss weights")
  if weights_V.dtype != np.float32 or token_stats.sha256_of(weights_V) != meta.get("weights_sha256"):
    raise ValueError(f"loss weights file {path!r} is corrupt: its weights do not match "
                     "their checksum.")
  return weights_V, meta


def load_or_save_weights(path: str, loss_cfg, stats: token_stats.TokenStats, *, eos_id: int,
                         write: bool = True, check: bool = True) -> np.ndarray:
  """The run's weights_V: computed from the counts by the config; saved at `path`
  when nothing is there (or when `check` is False: no checkpoint was trained with
  what is stored), otherwise checked against what is stored.

  Raises:
    ValueError: the stored weights were made by other settings or other counts, or
      differ from what these settings give (listing every difference).
  """
  weights_V = loss_weights(loss_cfg, stats, eos_id)
  settings = registry.weight_settings(loss_cfg)
  if not paths.path(path).exists():
    if write:
      save_weights(path, weights_V, settings, stats)
    return weights_V
  stored_V, meta = load_weights(path)
  diffs = [f"{k}: stored {meta['settings'].get(k)!r}, now {settings.get(k)!r}"
           for k in sorted(set(settings) | set(meta["settings"]))
           if meta["settings"].get(k) != settings.get(k)]
  if meta.get("counts_sha256") != stats.metadata()["counts_sha256"]:
    diffs.append("counts: the stored weights were made from other token counts")
  if not diffs and not np.array_equal(stored_V, weights_V):
    diffs.append(f"values: max |stored - now| = {np.abs(stored_V - weights_V).max():.3g}")
  if diffs and not check:  # no checkpoint was trained with them: replace them
    if write:
      save_weights(path, weights_V, settings, stats)
      multihost.log(f"loss weights: replaced {path} ({'; '.join(diffs)})")
    return weights_V
  if diffs:
    raise ValueError(f"loss weights {path!r} do not match this run ({'; '.join(diffs)}); "
                     "use a new --workdir or --config.resume=False.")
  return stored_V


def prepare_weights(loss_cfg, workdir: str, stats: token_stats.TokenStats, *, resuming: bool,
                    eos_id: int) -> np.ndarray:
  """The run's loss weights from the stats, stored beside them. A resumed run checks
  them against what is stored (its checkpoints were trained with those); a fresh run
  (re)writes them."""
  import jax

  path = str(paths.path(workdir) / "checkpoints" / WEIGHTS_FILENAME)
  return load_or_save_weights(path, loss_cfg, stats, eos_id=eos_id,
                              write=jax.process_index() == 0, check=resuming)
