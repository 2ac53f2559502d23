"""The benchmark and demo scripts keep running (small sizes here; `make bench` runs the real ones)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_prints_its_table():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_numerics.py"), "--size", "256",
                          "--repeats", "2"], capture_output=True, text=True, timeout=300)
    assert "| fake_quantize per-channel int8 256x256 (forward) |" in out.stdout, out.stderr
    assert "NF4 quantize+dequantize" in out.stdout
    assert out.stderr == ""


@pytest.mark.slow
def test_demo_prints_its_table():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "demo.py")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.ao dynamic int8" in out.stdout and "SmolLM2" in out.stdout
    print(out.stdout)
