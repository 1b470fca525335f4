"""A plain (non-editable) wheel carries conf/ and cli/ and runs from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile

import pytest
import yaml

from conftest import REPO


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "dist")], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("llavanext-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "llavanext/conf/finetune.yaml" in names and "llavanext/conf/model/7b.yaml" in names
    assert "llavanext/cli/main.py" in names and "llavanext/demo/tokenizer.json" in names
    assert not any(n.startswith(("tests/", "conf/", "cli/")) for n in names)

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # the wheel's copy first on the path; dependencies still come from this environment
    env = {**os.environ, "PYTHONPATH": str(site)}
    where = subprocess.run([sys.executable, "-c", "import llavanext.cli, llavanext.conf; print(llavanext.conf.__file__)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(site))
    out = subprocess.run([sys.executable, "-m", "llavanext", "finetune", "--cfg", "job", "model=7b"],
                         cwd=elsewhere, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["model"]["name"] == "7b"
    script = site / "bin" / "llavanext"
    assert script.is_file()
    help_out = subprocess.run([sys.executable, str(script), "--help"], cwd=elsewhere, env=env,
                              capture_output=True, text=True, check=True)
    assert "finetune" in help_out.stdout
