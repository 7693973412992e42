"""Which JAX platform a run starts: decided before jax is imported (JAX reads
JAX_PLATFORMS once, at import), so this module imports no jax."""

from __future__ import annotations

import glob
import importlib.util
import os
import sys

# Google's PCI vendor id, and the device ids of its TPU chips (v3, an unnamed one, v4,
# v5p, v5e, v6e, TPU7x): jax/_src/hardware_utils.py's table, copied because importing
# jax would fix JAX_PLATFORMS before it is set. The vendor id alone is not a TPU: a
# GCE CPU VM's gVNIC network card is a Google PCI device too.
GOOGLE_PCI_VENDOR = "0x1ae0"
TPU_PCI_DEVICES = ("0x0027", "0x0056", "0x005e", "0x0062", "0x0063", "0x006f", "0x0076")
GPU_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")


def tpu_attached(pci_devices: str = "/sys/bus/pci/devices", dev: str = "/dev") -> bool:
  """Whether a TPU chip is on this host: a PCI device with Google's vendor id and a
  TPU's device id, or a TPU driver's /dev/accel* node (so a TPU generation newer than
  the table is not pinned to the CPU where its driver is loaded)."""
  if glob.glob(os.path.join(dev, "accel*")):
    return True
  for folder in glob.glob(os.path.join(pci_devices, "*")):
    try:
      with open(os.path.join(folder, "vendor")) as v, open(os.path.join(folder, "device")) as d:
        if v.read().strip() == GOOGLE_PCI_VENDOR and d.read().strip() in TPU_PCI_DEVICES:
          return True
    except OSError:
      continue
  return False


def pin_cpu_without_tpu(argv: list[str] | None = None,
                        pci_devices: str = "/sys/bus/pci/devices", dev: str = "/dev") -> None:
  """JAX_PLATFORMS=cpu where libtpu is installed (requirements-tpu.txt, for --plan) but
  no TPU is attached and no GPU plugin is installed: JAX would otherwise try the TPU
  backend first and log libtpu's warnings at every start. An explicit JAX_PLATFORMS
  wins; a TPU VM (tpu_attached) and a GPU machine are left alone; a --plan (argv,
  default sys.argv) always runs on the CPU, compiling for TPU topologies
  (pdl_jax.train.tpu_targets)."""
  # An empty JAX_PLATFORMS is unset to jax (its backends tried in turn): not explicit.
  if os.environ.get("JAX_PLATFORMS") or importlib.util.find_spec("libtpu") is None:
    return
  argv = sys.argv if argv is None else argv
  if any(a == "--plan" or a.startswith("--plan=") for a in argv[1:]):
    # A plan compiles for libtpu's topology devices and runs nothing: no backend of
    # this host is started, not even on a TPU VM (whose chips a run may be using).
    os.environ["JAX_PLATFORMS"] = "cpu"
    return
  if any(importlib.util.find_spec(p) for p in GPU_PLUGINS):
    return
  if not tpu_attached(pci_devices, dev):
    os.environ["JAX_PLATFORMS"] = "cpu"
