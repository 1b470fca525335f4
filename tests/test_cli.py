"""The CLI through the installed `llavanext` entry point."""

from __future__ import annotations

import subprocess
import sys

import yaml

from conftest import cli
from llavanext.cli.main import COMMANDS


def test_help_lists_every_command_with_examples():
    out = cli("--help")
    assert out.returncode == 0
    for name in COMMANDS:
        assert f"  {name}  " in out.stdout or f"  {name} " in out.stdout
    assert "Examples:" in out.stdout and "llavanext finetune" in out.stdout
    assert cli().stdout == out.stdout  # bare `llavanext` shows the same


def test_help_does_not_import_torch_or_hydra():
    code = ("import sys; from llavanext.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'hydra', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_unknown_command_names_the_choices():
    out = cli("fintune")
    assert out.returncode == 2
    assert "unknown command 'fintune'" in out.stderr and "Did you mean 'finetune'" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_group_option_names_the_options():
    out = cli("finetune", "model=7c")
    assert out.returncode == 2
    assert "model=7c" in out.stderr and "7b" in out.stderr and "tiny" in out.stderr
    assert "Traceback" not in out.stderr


def test_unknown_key_suggests_the_right_one():
    out = cli("finetune", "optim.lrr=1e-4")
    assert out.returncode == 2
    assert "optim.lrr" in out.stderr and "Did you mean 'lr'" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1


def test_unbuilt_command_says_so_and_fails():
    unbuilt = [name for name, c in COMMANDS.items() if c.task is None]
    for name in unbuilt:
        out = cli(name)
        assert out.returncode != 0 and "not built yet" in out.stderr


def test_command_help_shows_groups_and_options():
    out = cli("finetune", "--help")
    assert out.returncode == 0
    assert "model: 13b, 7b, mistral_7b, tiny" in out.stdout
    assert "peft: lora, none" in out.stdout


def test_cfg_job_prints_the_composed_config_and_runs_nothing(tmp_path):
    out = cli("finetune", "--cfg", "job", "model=7b", "peft=lora", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["model"]["text"]["hidden_size"] == 4096
    assert cfg["peft"]["method"] == "lora" and cfg["parts"]["language_model"] == "lora"
    assert not (tmp_path / "outputs").exists()


def test_a_user_mistake_inside_the_task_is_one_line(tmp_path):
    out = cli("finetune", "peft=lora", "parts.language_model=full", "trainer.max_steps=1", cwd=tmp_path)
    assert out.returncode == 1
    assert "peft=lora applies LoRA to the language model" in out.stderr
    assert "Traceback" not in out.stderr


def test_sweep_makes_one_run_per_value(tmp_path):
    out = cli("finetune", "-m", "model=tiny", "data=demo", "optim.lr=1e-4,3e-4", "trainer.max_steps=2",
              "data.num_train=16", "data.num_val=8", "trainer.progress_bar=none", "hydra.sweep.dir=sweep",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted((tmp_path / "sweep").glob("*/config.yaml"))
    assert len(runs) == 2
    assert sorted(yaml.safe_load(p.read_text())["optim"]["lr"] for p in runs) == [1e-4, 3e-4]
    for run in runs:
        assert (run.parent / "checkpoints" / "last.ckpt").is_file()
