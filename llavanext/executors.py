"""Launchers for `executor=local` (torchrun on this node) and `executor=slurm` (sbatch + srun).

Neither starts ranks itself: torchrun and srun do, and Lightning reads the rank, the world size
and the rendezvous address from the environment they set (TorchElasticEnvironment,
SLURMEnvironment). What this module adds is the command each rank runs: the same command line
with the run folder pinned (`hydra.run.dir`) and `executor.launched=true`, so every rank, and a
requeued Slurm job, writes into the one run folder.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from llavanext.errors import ConfigError, LlavaNextError
from llavanext.run import output_dir

SCRIPT = "sbatch.sh"


def entry_point() -> str:
    """This environment's `llavanext` console script. Not `python -m llavanext`: from a checkout's root
    that imports the source folder `llavanext/` instead of the installed package."""
    beside = Path(sys.executable).parent / "llavanext"
    found = str(beside) if beside.is_file() else shutil.which("llavanext")
    if found is None:
        raise LlavaNextError("no `llavanext` console script beside this Python or on PATH to start the ranks with")
    return found


def rank_args(cfg: DictConfig, run_dir: Path, *extra: str, drop: tuple[str, ...] = ()) -> list[str]:
    """What each rank runs after the entry point: this command's overrides, the run folder pinned, training in place."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("executor.dry_run=", *drop))]
    return [cfg.command, *overrides, f"hydra.run.dir={run_dir}", "executor.launched=true", *extra]


def launch(cfg: DictConfig) -> Path:
    from llavanext.train import print_plan

    run_dir = output_dir(cfg).resolve()
    if cfg.executor.name == "local":
        return local(cfg, run_dir, print_plan)
    if cfg.executor.name == "slurm":
        return slurm(cfg, run_dir, print_plan)
    raise ConfigError(f"executor={cfg.executor.name!r}; choose direct, local or slurm")


def local(cfg: DictConfig, run_dir: Path, print_plan) -> Path:
    ex = cfg.executor
    if ex.nodes != 1:
        raise ConfigError(f"executor=local runs on this node: executor.nodes={ex.nodes} needs executor=slurm")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
               f"--nproc-per-node={ex.devices}", "--no-python", entry_point(), *rank_args(cfg, run_dir)]
    if ex.dry_run:
        print_plan(cfg, with_config=True)
        print("torchrun command:\n  " + shlex.join(command))
        return run_dir
    print(f"executor=local: torchrun, {ex.devices} processes; run folder {run_dir}", flush=True)
    done = subprocess.run(command, check=False)
    if done.returncode:
        raise LlavaNextError(f"torchrun exited with code {done.returncode}; see the output above and {run_dir}")
    return run_dir


def sbatch_script(cfg: DictConfig, run_dir: Path) -> str:
    ex = cfg.executor
    flags = [f"--job-name={ex.job_name}", f"--nodes={ex.nodes}", f"--ntasks-per-node={ex.devices}",
             f"--cpus-per-task={ex.cpus_per_task}", f"--time={ex.time}",
             f"--output={run_dir}/slurm-%j.out", f"--error={run_dir}/slurm-%j.err", "--open-mode=append",
             f"--signal={ex.signal}", "--requeue"]
    if ex.gpus_per_node:
        flags.append(f"--gpus-per-node={ex.gpus_per_node}")
    for key in ("partition", "account", "mem"):
        if ex.get(key):
            flags.append(f"--{key}={ex[key]}")
    flags += list(ex.sbatch_args)
    srun = ["srun", *ex.srun_args, ex.command or entry_point(),
            *rank_args(cfg, run_dir, "resume=auto", drop=("resume=",))]
    lines = ["#!/bin/bash", f"# {cfg.command} run {run_dir.name}, written by llavanext; resubmit with sbatch",
             *(f"#SBATCH {flag}" for flag in flags), "",
             *ex.setup,
             f"cd {shlex.quote(os.getcwd())}",
             # a requeued job starts here again; resume=auto continues from the newest complete checkpoint
             "exec " + shlex.join(srun), ""]
    return "\n".join(lines)


def slurm(cfg: DictConfig, run_dir: Path, print_plan) -> Path:
    ex = cfg.executor
    run_dir.mkdir(parents=True, exist_ok=True)
    script = run_dir / SCRIPT
    script.write_text(sbatch_script(cfg, run_dir))
    if ex.dry_run:
        print_plan(cfg, with_config=True)
        print(f"sbatch script ({script}, not submitted):\n{script.read_text()}")
        return run_dir
    print_plan(cfg)
    if shutil.which("sbatch") is None:
        raise LlavaNextError(f"executor=slurm: no sbatch on PATH; the script is in {script}")
    done = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, check=False)
    if done.returncode:
        raise LlavaNextError(f"sbatch refused {script}: {done.stderr.strip() or done.stdout.strip()}")
    job = done.stdout.strip().split(";")[0]
    (run_dir / "slurm_job_id").write_text(job + "\n")
    print(f"submitted Slurm job {job}\n  script: {script}\n"
          f"  logs:   {run_dir}/slurm-{job}.out, {run_dir}/slurm-{job}.err\n"
          f"  watch:  squeue -j {job}; cancel: scancel {job}", flush=True)
    return run_dir
