"""Shared config defaults: the loss and the device mesh.

Task configs (summarization.py, dialogue.py, style_transfer.py) build on these.
"""

import ml_collections


def get_loss_config() -> ml_collections.ConfigDict:
  """The loss section: which loss, and how PDL weights are made from counts."""
  c = ml_collections.ConfigDict()
  c.name = "pdl"  # "ce" (plain cross-entropy) or "pdl" (power-law decay loss).
  c.alpha = 0.5  # Decay exponent of w(t) = 1 / (freq(t) + eps) ** alpha; 0 = CE.
  c.epsilon = ml_collections.FieldReference(None, field_type=float)  # None: add-one smoothing.
  c.frequency = "relative"  # "relative" (count / total) or "count" (raw counts).
  c.normalize = True  # Rescale weights to mean 1 over corpus tokens.
  c.max_weight = ml_collections.FieldReference(None, field_type=float)  # Clip; None = off.
  return c


def get_mesh_config() -> ml_collections.ConfigDict:
  """Mesh sizes per axis; -1 takes the remaining devices."""
  c = ml_collections.ConfigDict()
  c.data = -1  # Data-parallel axis: batch is split over it.
  c.model = 1  # Model axis: vocabulary, MLP and heads are split over it.
  return c
