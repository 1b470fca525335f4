"""The demo (`make demo`) really learns: held-out accuracy well above chance."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_learns(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llavanext.demo", "--out", str(tmp_path / "demo")],
                         cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "accuracy" in out.stdout and "pretrain" in out.stdout
    summary = json.loads((tmp_path / "demo" / "accuracy.json").read_text())
    assert summary["n"] == 200
    # chance is about 29% over the question mix; colour alone is 1 in 6
    assert summary["accuracy"]["all"] >= summary["chance"] + 0.2, summary
    assert summary["accuracy"]["color"] >= 0.6, summary
