"""scripts/gpu-check.sh: without CUDA it refuses in one line (exit 2); its CPU dry run goes end to end (slow)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockstate.benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("PYTHONPATH", None)  # the script sets PYTHONPATH=src itself: it must not need an install
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")
def test_without_cuda_one_line_and_exit_2(tmp_path):
    out = tmp_path / "out"
    result = run_script(str(out), timeout=120)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-dry-run" in lines[0]
    assert not out.exists()


def test_usage_errors(tmp_path):
    assert run_script(timeout=30).returncode == 64
    assert run_script(str(tmp_path), "--bogus", timeout=30).returncode == 64


@pytest.mark.slow
def test_cpu_dry_run_end_to_end(tmp_path):
    out = tmp_path / "check"
    start = time.monotonic()
    result = run_script(str(out), "--cpu-dry-run", timeout=400)
    wall = time.monotonic() - start
    log = (out / "gpu-check.log").read_text()
    assert result.returncode == 0, log[-4000:]
    assert "gpu-check: every step passed" in log
    files = sorted(p.name for p in out.iterdir() if p.suffix in (".json", ".png"))
    assert len(files) <= 8
    for name in ("layers-cpu.json", "layers-cpu-bf16.json", "train.json", "generation.json"):
        assert name in files, files
    assert "Block-Recurrent / BST:SH" in log and "BST:SH / sliding window" in log
    assert "MiB with gradient checkpointing" in log
    print(f"gpu-check --cpu-dry-run: {wall:.0f} s wall")  # the bound is 3 minutes on a quiet machine


def test_goals_report_from_saved_results(tmp_path):
    """The goals report reads what the benches write (no benchmark run: hand-made payloads)."""
    import json

    layer = {"median": 1.0, "min": 1.0, "max": 1.0}
    payload = {"machine": {"device": "X"}, "setting": {"dim": 8, "block": 4}, "lengths": [4096],
               "results": {name: {"forward": {"4096": {**layer, "median": t}}, "backward": {"4096": layer},
                                  "memory": {}}
                           for name, t in (("bst-sh-s4", 1.0), ("brect", 12.0), ("slide", 0.8))}}
    (tmp_path / "layers-gpu.json").write_text(json.dumps(payload))
    text = gpu_check.report(tmp_path)
    assert "Block-Recurrent / BST:SH       goal > 10  : 4k 12.00  [met]" in text
    assert "BST:SH / sliding window        goal < 2   : 4k 1.25  [met]" in text
