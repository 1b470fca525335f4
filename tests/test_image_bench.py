"""bench/image_bench.py runs (tiny model, one repeat) and its table shows the stated tolerance."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_image_bench_runs_and_reports_within_tolerance():
    run = subprocess.run([sys.executable, str(REPO / "bench/image_bench.py"), "--model", "tiny", "--repeat", "1"],
                         capture_output=True, text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = run.stdout.split("one LLaVA record end to end")
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in first.splitlines() if line.startswith("│")]
    rows = [r for r in rows if " x " in r[0]]
    assert len(rows) == 7
    assert all(float(r[5]) == 0 and float(r[8]) <= 2 for r in rows), rows  # pil diff, torch diff
    assert sum(line.startswith("│") and " x " in line for line in second.splitlines()) == 7
