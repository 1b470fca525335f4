"""executor=local: torchrun starts one process per device (2 CPU processes with gloo here). FSDP2 writes
sharded checkpoint folders, and a run resumed from one continues exactly: same losses, same batches.
The assistant-only fused loss (model.loss_chunk) trains under FSDP2 exactly as transformers' loss."""

import csv
import os
import subprocess
import sys

import pytest

ARGS = ["finetune", "executor=local", "executor.devices=2", "strategy=fsdp", "trainer.accelerator=cpu",
        "data=mock", "data.num_samples=24", "data.seq_length=512", "data.text_tokens=[60,60]",
        "data.image_sizes=[[112,112]]", "data.micro_batch_size=2", "trainer.max_steps=4",
        "trainer.checkpoint_every=2", "trainer.log_every_n_steps=1", "trainer.progress_bar=none",
        "trainer.deterministic=true", "optim.warmup_steps=1"]


def losses(path):
    with open(path) as f:
        return {int(r["step"]) + 1: float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_fsdp_on_two_processes_resumes_from_a_sharded_checkpoint(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run([sys.executable, "-m", "llavanext", *ARGS, f"hydra.run.dir={run}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    shard = run / "checkpoints" / "step-2.ckpt"
    assert sorted(p.name for p in shard.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    # 24 samples, 2 ranks x micro-batch 2: 6 batches an epoch per rank
    assert "world size 2" in first.stdout
    whole = losses(run / "logs" / "metrics.csv")

    again = subprocess.run([sys.executable, "-m", "llavanext", *ARGS, f"hydra.run.dir={run}", f"resume={shard}"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    resumed = losses(run / "logs" / "metrics.csv")  # the first run's curve was moved aside
    assert sorted(resumed) == [3, 4]
    assert [resumed[s] for s in (3, 4)] == [whole[s] for s in (3, 4)]


@pytest.mark.slow
def test_fused_loss_under_fsdp_trains_as_transformers_loss(tmp_path):
    """The fused loss reads lm_head.weight outside the model's forward; run as a registered forward of the
    FSDP2 root, it sees the gathered weight and the head's gradient is reduced: the curves agree."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    curves = []
    for chunk in (4096, 0):
        run = tmp_path / f"chunk-{chunk}"
        done = subprocess.run([sys.executable, "-m", "llavanext", *ARGS, f"model.loss_chunk={chunk}",
                               "trainer.checkpoint_every=100", f"hydra.run.dir={run}"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        curves.append(losses(run / "logs" / "metrics.csv"))
    fused, plain = curves
    assert sorted(fused) == sorted(plain) == [1, 2, 3, 4]
    assert fused[4] < fused[1]
    for step in fused:
        assert abs(fused[step] - plain[step]) < 1e-4 * abs(plain[step]), (step, fused, plain)
