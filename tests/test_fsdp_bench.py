"""bench/fsdp_bench.py on two CPU processes (gloo): every row runs, and the levers leave the loss unchanged
(same weights, same batches; the assistant-only fused loss under FSDP2 included)."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_fsdp_bench_smoke_on_two_processes(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(REPO / "bench/fsdp_bench.py"),
           "--model", "tiny", "--device", "cpu", "--steps", "3", "--warmup", "1", "--lr", "3e-3", "--workers", "0",
           "--out", str(tmp_path)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((tmp_path / "bench.json").read_text())["results"]
    assert {r["case"] for r in results} == {"worst", "mixed"}
    assert not [r for r in results if "error" in r]
    assert next(r for r in results if r["row"].startswith("+ packing"))["padding"] == 0.0
    # fp32 on CPU: ours trains exactly as the baseline (the FSDP2 gradients of the fused loss included)
    diffs = [float(x) for x in re.findall(r"max \|diff\| ([\d.]+)", run.stdout)]
    assert len(diffs) == 2 and max(diffs) < 1e-3, run.stdout[-2000:]
