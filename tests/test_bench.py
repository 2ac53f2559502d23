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
def test_ptq_bench_records_lab3_targets():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_ptq.py"), "--test", "64", "--repeats", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.stderr == "", out.stderr[-2000:]
    rows = [ln for ln in out.stdout.splitlines() if ln.startswith("| ")]
    for what in ("accuracy drop, torch.ao", "accuracy drop, W8A16", "accuracy drop, W8A8 dynamic",
                 "accuracy drop, W8A8 static", "size, own W8A16", "speed-up, batch 8x128", "calibration shift"):
        assert any(what in r for r in rows), (what, out.stdout)
    assert all(r.count("|") == 5 for r in rows), out.stdout  # a well-formed table, no stray bars
    assert "\r" not in out.stdout  # no progress bars in a log


@pytest.mark.slow
def test_demo_prints_its_table():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "demo.py")], capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.ao dynamic int8" in out.stdout and "SmolLM2" in out.stdout
    print(out.stdout)


@pytest.mark.slow
def test_judging_bench_grades_both_versions():
    """Lab 1's solution graded judged and with the in-kernel tests of before, full marks both (the
    script exits on anything less); the ratio is `make bench`'s to judge, not this test's."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_judging.py"), "--labs", "lab01_precision_formats",
                          "--repeats", "1"], capture_output=True, text=True, timeout=600)
    if out.returncode == 2 and "not in this clone" in out.stderr:
        pytest.skip(out.stderr.strip())
    assert out.returncode in (0, 1), out.stderr[-2000:]
    assert "| lab01_precision_formats |" in out.stdout and "target: judged" in out.stdout, out.stdout


@pytest.mark.slow
def test_cluster_bench_grades_the_class_both_ways():
    """Two students of lab 1 graded locally and on a real Dask cluster of two workers, with equal
    grades (the script exits 2 otherwise); the ratio and overhead are `make bench`'s to judge."""
    pytest.importorskip("distributed")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_cluster.py"), "--students", "2"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stdout + out.stderr[-2000:]
    assert "| local, 1 job |" in out.stdout and "grades equal to local: yes" in out.stdout, out.stdout
