"""Exact resume: a run killed with SIGKILL (at a step, and while writing a checkpoint) and resumed
with resume=auto trains the same steps on the same batches as the run that was never stopped:
the loss curves agree step by step and the final weights are equal."""

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llavanext.run import last_checkpoint

# LoRA dropout draws random numbers every step, so the RNG state has to survive too;
# 40 samples / micro-batch 4 = 10 batches an epoch, so 16 steps cross an epoch boundary.
ARGS = ["finetune", "model=tiny", "data=demo", "peft=lora", "data.num_train=40", "data.num_val=8",
        "data.micro_batch_size=4", "trainer.max_steps=16", "trainer.checkpoint_every=3",
        "trainer.log_every_n_steps=1", "trainer.print_every=1", "trainer.progress_bar=none",
        "trainer.deterministic=true", "optim.warmup_steps=4"]

# Runs the CLI, but the checkpoint of step 9 is cut off half-written and the process SIGKILLed.
KILL_WHILE_SAVING = """
import os, signal, sys
from lightning.pytorch.plugins.io import TorchCheckpointIO
save = TorchCheckpointIO.save_checkpoint
def cut_off(self, checkpoint, path, storage_options=None):
    save(self, checkpoint, path, storage_options)
    if checkpoint["global_step"] == 9:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        os.kill(os.getpid(), signal.SIGKILL)
TorchCheckpointIO.save_checkpoint = cut_off
from llavanext.cli.main import main
main(sys.argv[1:])
"""


def env():
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def cli(run_dir, *extra):
    return [sys.executable, "-m", "llavanext", *ARGS, f"hydra.run.dir={run_dir}", *extra]


def losses(run_dir: Path) -> dict[int, float]:
    """train/loss by global step (1-based, as printed) from every metrics CSV the run wrote."""
    out = {}
    for path in sorted((run_dir / "logs").glob("metrics*.csv")):
        with open(path) as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    out[int(row["step"]) + 1] = float(row["train/loss"])
    return out


def step_of(checkpoint: Path) -> int:
    return torch.load(checkpoint, weights_only=True)["global_step"]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "step-15.ckpt", weights_only=True)["state_dict"]


@pytest.mark.slow
def test_killed_runs_resume_exactly(tmp_path):
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    subprocess.run(cli(unbroken), cwd=tmp_path, env=env(), check=True, capture_output=True)
    reference = losses(unbroken)
    assert sorted(reference) == list(range(1, 17))

    # 1. killed while writing the checkpoint of step 9: the partial file stays aside
    died = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *cli(broken)[3:]], cwd=tmp_path, env=env(),
                          capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    assert (broken / "checkpoints" / "step-9.ckpt.tmp").is_file()
    assert not (broken / "checkpoints" / "step-9.ckpt").exists()
    assert step_of(last_checkpoint(broken)) == 6

    # 2. resumed, then killed from outside once step 13 has been printed (between checkpoints)
    proc = subprocess.Popen(cli(broken, "resume=auto"), cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    printed = []
    for line in proc.stdout:
        printed.append(line)
        if line.startswith("step    13/"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(printed)[-2000:]
    assert any(line.startswith("resume=auto: continuing from") for line in printed)
    assert step_of(last_checkpoint(broken)) == 12

    # 3. resumed to the end
    done = subprocess.run(cli(broken, "resume=auto"), cwd=tmp_path, env=env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resume=auto: continuing from" in done.stdout

    resumed = losses(broken)
    assert [resumed[s] for s in range(13, 17)] == [reference[s] for s in range(13, 17)]
    a, b = weights(unbroken), weights(broken)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run's weights differ from the unbroken run's"
