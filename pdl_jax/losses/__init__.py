"""The losses: one LossSpec registry (registry.py), PDL and CE (pdl.py), the baselines
(baselines.py), the chunked path without [B, L, V] logits (chunked.py), the loss window
(window.py), the loss of a batch from the model's output (batch_loss.py) and the
weights a run's token stats give (weights.py)."""

from pdl_jax.losses.registry import LossSpec, SPECS, get_loss, spec  # noqa: F401  (the API)
