"""Shared test helpers: compose a command's config, run the CLI, tiny training runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]


def compose(command: str, overrides: list[str] = (), run_dir: Path | None = None) -> DictConfig:
    """The config `llavanext <command> <overrides>` would run with (outside Hydra's run folder)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="llavanext.conf", version_base="1.3"):
        cfg = hydra_compose(config_name=command, overrides=list(overrides))
    if run_dir is not None:
        with open_dict(cfg):
            cfg.run_dir = str(run_dir)
    return cfg


def cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: int = 600):
    """Run the installed `llavanext` entry point."""
    exe = Path(sys.executable).with_name("llavanext")
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=full_env)


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """Each test session gets its own LLAVANEXT_HOME so nothing touches the user's store."""
    home = tmp_path_factory.getbasetemp() / "llavanext-home"
    monkeypatch.setenv("LLAVANEXT_HOME", str(home))
