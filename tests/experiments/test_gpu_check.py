"""experiments/gpu_check.py's --dry_run: the GPU check's code paths on the CPU (tiny
shapes; cudnn falls back to xla here with its log line)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gpu_check_dry_run_prints_its_table():
  out = subprocess.run(["bash", "experiments/gpu_check.sh", "--dry_run"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600,
                       env={**os.environ, "JAX_PLATFORMS": "cpu",
                            "PATH": os.path.dirname(sys.executable) + ":" + os.environ["PATH"]})
  assert out.returncode == 0, out.stderr[-2000:]
  lines = out.stdout.splitlines()
  rows = [l.split() for l in lines if l.startswith("tiny-llama")]
  # cuDNN refuses on the CPU: the row says the model ran xla.
  assert [r[1] for r in rows] == ["xla", "cudnn>xla"], out.stdout
  assert all(float(r[6].replace(",", "")) > 0 for r in rows)  # train tokens/s
  assert "cudnn attention needs a GPU" in out.stderr


def test_the_mfu_peak_comes_from_the_device_kind_or_the_flag():
  sys.path.insert(0, ROOT)
  from experiments import gpu_check
  assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
  assert gpu_check.peak_tflops("NVIDIA H100 PCIe", None) == 756.0
  assert gpu_check.peak_tflops("NVIDIA H100 NVL", None) == 835.0
  assert gpu_check.peak_tflops("NVIDIA A10G", None) == 70.0
  assert gpu_check.peak_tflops("NVIDIA A100-SXM4-80GB", None) == 312.0
  assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", 500.0) == 500.0
  with pytest.raises(SystemExit, match="'Tesla T4'.*pass --peak_tflops"):
    gpu_check.peak_tflops("Tesla T4", None)
