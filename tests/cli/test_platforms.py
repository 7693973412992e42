"""pdl_jax/cli/platforms.py: a TPU is a Google PCI device with a TPU's device id, not
any Google PCI device (a GCE CPU VM's gVNIC card is one)."""

from __future__ import annotations

import importlib.util
import os

from pdl_jax.cli import platforms


def pci(root, *devices):
  for i, (vendor, device) in enumerate(devices):
    d = root / f"0000:00:{i:02x}.0"
    d.mkdir(parents=True)
    (d / "vendor").write_text(vendor + "\n")
    (d / "device").write_text(device + "\n")
  return str(root)


def test_a_tpu_is_a_google_device_with_a_tpu_device_id(tmp_path):
  gvnic, nvidia = ("0x1ae0", "0x0042"), ("0x10de", "0x2330")
  dev = tmp_path / "dev"
  dev.mkdir()
  (dev / "nvidia0").touch()
  attached = lambda bus: platforms.tpu_attached(bus, str(dev))
  assert not attached(pci(tmp_path / "cpu_vm", gvnic, ("0x1af4", "0x1000")))
  assert not attached(pci(tmp_path / "gpu_vm", gvnic, nvidia))
  assert attached(pci(tmp_path / "v5e", gvnic, ("0x1ae0", "0x0063")))
  assert not attached(str(tmp_path / "no_such_bus"))
  (dev / "accel0").touch()  # a TPU driver's node: a TPU whatever the table says
  assert attached(str(tmp_path / "no_such_bus"))


def test_pin_cpu_on_a_cpu_vm_with_libtpu_but_not_on_a_tpu_vm(tmp_path, monkeypatch):
  """libtpu installed (requirements-tpu.txt; find_spec is faked, so this runs without
  it): a GCE CPU VM pins the CPU, a TPU VM is left to JAX, --plan pins the CPU
  anywhere, an explicit JAX_PLATFORMS wins."""
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name: None if "cuda" in name else object())
  cpu_vm = pci(tmp_path / "cpu_vm", ("0x1ae0", "0x0042"))
  tpu_vm = pci(tmp_path / "tpu_vm", ("0x1ae0", "0x0042"), ("0x1ae0", "0x005e"))
  cases = [(cpu_vm, ["main"], "cpu"), (tpu_vm, ["main"], None),
           (tpu_vm, ["main", "--plan=v5e-4"], "cpu")]
  for bus, argv, expected in cases:
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    platforms.pin_cpu_without_tpu(argv, bus, str(tmp_path))
    assert os.environ.get("JAX_PLATFORMS") == expected, (bus, argv)
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  platforms.pin_cpu_without_tpu(["main"], cpu_vm, str(tmp_path))
  assert os.environ["JAX_PLATFORMS"] == "tpu"
  # An empty value is jax's default (every backend tried), not a choice: pinned.
  monkeypatch.setenv("JAX_PLATFORMS", "")
  platforms.pin_cpu_without_tpu(["main"], cpu_vm, str(tmp_path))
  assert os.environ["JAX_PLATFORMS"] == "cpu"
