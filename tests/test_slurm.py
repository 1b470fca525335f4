"""executor=slurm against a real single-node Slurm (started by .ci/slurm-up.sh): a sweep submits one
job per run and each trains, a cancelled job is reported cancelled, and a preempted job saves,
requeues itself and resumes. Without a Slurm controller these tests skip and say why."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

TINY = ["executor=slurm", "executor.devices=1", "executor.gpus_per_node=0", "executor.cpus_per_task=1",
        "executor.time=00:10:00", "trainer.accelerator=cpu", "trainer.progress_bar=none", "trainer.print_every=1",
        "data.num_train=32", "data.num_val=8", "trainer.val_check_interval=1000"]


def slurm_problem() -> str | None:
    if shutil.which("sinfo") is None:
        return "no Slurm client (sinfo) on PATH; .ci/slurm-up.sh installs and starts a single-node Slurm"
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    if out.returncode:
        return f"no Slurm controller answers: {out.stderr.strip()[:200]}; .ci/slurm-up.sh starts one"
    if not re.search(r"^(idle|mixed|allocated)", out.stdout, re.M):
        return f"no usable Slurm node (sinfo says {out.stdout.split()}); .ci/slurm-up.sh starts one"
    return None


@pytest.fixture(scope="module")
def slurm():
    problem = slurm_problem()
    if problem:
        print(f"\nSKIPPING Slurm tests: {problem}", file=sys.stderr)
        pytest.skip(problem)


def submit(tmp_path, *args) -> tuple[list[str], str]:
    out = subprocess.run([sys.executable, "-m", "llavanext", *args], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    return re.findall(r"submitted Slurm job (\d+)", out.stdout), out.stdout


def job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True)
    found = re.search(r"JobState=(\w+)", out.stdout)
    return found.group(1) if found else "GONE"


def wait_for(condition, what: str, timeout: float = 240):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def finished(job: str) -> bool:
    return job_state(job) in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "GONE")


def test_sweep_submits_one_job_per_run_and_each_trains(slurm, tmp_path):
    jobs, printed = submit(tmp_path, "pretrain", "-m", *TINY, "trainer.max_steps=3", "trainer.checkpoint_every=2",
                           "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={tmp_path}/sweep")
    assert len(jobs) == 2, printed
    for job in jobs:
        wait_for(lambda job=job: finished(job), f"job {job}")
    for n, (job, lr) in enumerate(zip(jobs, ("0.001", "0.002"))):
        run = tmp_path / "sweep" / str(n)
        log = (run / f"slurm-{job}.out").read_text()
        assert job_state(job) == "COMPLETED", log + (run / f"slurm-{job}.err").read_text()[-3000:]
        assert "done: 3 steps" in log
        assert f"optim.lr={lr}" in (run / "sbatch.sh").read_text()
        assert (run / "checkpoints" / "step-2.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").exists()
        assert (run / "config.yaml").is_file() and (run / "manifest.json").is_file()


def test_a_cancelled_job_is_reported_cancelled(slurm, tmp_path):
    (job,), _ = submit(tmp_path, "pretrain", *TINY, "trainer.max_steps=100000", f"hydra.run.dir={tmp_path}/run")
    wait_for(lambda: job_state(job) == "RUNNING", f"job {job} to run")
    subprocess.run(["scancel", job], check=True)
    wait_for(lambda: finished(job), f"job {job} to stop", timeout=60)
    assert job_state(job) == "CANCELLED"
    wait_for(lambda: "CANCELLED" in Path(f"{tmp_path}/run/slurm-{job}.err").read_text(), "the cancel in the log", 30)


@pytest.mark.slow
def test_preemption_saves_requeues_and_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    # long enough that the signal lands during training (a tiny step can take 10 ms)
    (job,), _ = submit(tmp_path, "pretrain", *TINY, "trainer.max_steps=150", "trainer.checkpoint_every=1000",
                       f"hydra.run.dir={run}")
    log = run / f"slurm-{job}.out"
    wait_for(lambda: log.exists() and "step     3/150" in log.read_text(), f"job {job} to reach step 3")
    # what Slurm sends before the time limit (--signal=USR1@90): Lightning saves and requeues the job
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    wait_for(lambda: job_state(job) == "PENDING", f"job {job} to be requeued", timeout=60)
    assert (run / "hpc_ckpt_1.ckpt").is_file()
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)  # skip requeue delay
    wait_for(lambda: finished(job), f"requeued job {job}")
    text = log.read_text()
    assert job_state(job) == "COMPLETED", text[-3000:]
    assert f"continuing from {run}/hpc_ckpt_1.ckpt" in text
    assert "done: 150 steps" in text
