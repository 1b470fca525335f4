"""The run folder: resolved config, manifest, checkpoints and logs of one run."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llavanext.errors import CheckpointError

CONFIG = "config.yaml"
MANIFEST = "manifest.json"
CHECKPOINTS = "checkpoints"
PACKAGES = ("llavanext", "torch", "transformers", "lightning", "hydra-core", "omegaconf", "peft", "datasets")


def output_dir(cfg: DictConfig) -> Path:
    """Hydra's run (or sweep job) folder; outside Hydra, `cfg.run_dir`."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        return Path(cfg.run_dir)


def git_revision() -> str | None:
    """The checkout's revision (with `+dirty`) when the project runs from a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if rev.returncode:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
        return rev.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def write_run_files(run_dir: Path, cfg: DictConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(run_dir / CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    manifest = {
        "command_line": sys.argv,
        "command": cfg.get("command"),
        "git_revision": git_revision(),
        "versions": versions(),
        "seed": cfg.get("seed"),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    manifest_path = run_dir / MANIFEST
    if manifest_path.exists():  # a resumed run keeps the history of its starts
        previous = json.loads(manifest_path.read_text())
        manifest["previous_starts"] = previous.pop("previous_starts", []) + [previous]
    atomic_write(manifest_path, json.dumps(manifest, indent=2))


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_run_config(run_dir: str | Path) -> DictConfig:
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a run folder (no {CONFIG})")
    return OmegaConf.load(path)


def last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run: `checkpoints/*.ckpt` (a file, or a folder when
    sharded) or one Lightning wrote on Slurm's preemption signal (`hpc_ckpt_N.ckpt`).
    Checkpoints are written under a `.tmp` name and renamed when complete, so a partial one never counts."""
    run_dir = Path(run_dir)
    found = [p for p in (*(run_dir / CHECKPOINTS).glob("*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")) if p.exists()]
    return max(found, key=lambda p: p.stat().st_mtime).resolve() if found else None  # a linked last.ckpt names its target


def is_checkpoint(path: Path) -> bool:
    """A checkpoint file, or a sharded checkpoint's folder (Lightning's FSDP format: shards + meta.pt)."""
    return path.is_file() or (path / "meta.pt").is_file()


def is_sharded(path: Path) -> bool:
    """A torch.distributed.checkpoint folder, as Lightning's FSDPStrategy writes for a sharded state dict."""
    return path.is_dir() and (path / ".metadata").is_file()


def resolve_checkpoint(source: str | Path) -> Path:
    """A checkpoint file or sharded checkpoint folder, or a run folder's last checkpoint."""
    path = Path(source)
    if is_checkpoint(path):
        return path
    if path.is_dir():
        found = last_checkpoint(path)
        if found is None:
            raise CheckpointError(f"run folder {path} has no checkpoint under {CHECKPOINTS}/")
        return found
    raise CheckpointError(f"{source} is neither a checkpoint file nor a run folder")


def read_weights(path: Path, like: dict) -> dict:
    """A checkpoint's model weights, names without Lightning's `model.` prefix.

    A .ckpt file is read whole. A sharded folder is consolidated straight into the tensors of
    `like` (the model's own state dict, same names), so neither the optimizer states nor a second
    copy of the weights is ever in memory; its tensors that `like` lacks or shapes differently
    come back as meta tensors of the saved shape, for the caller's checks.
    """
    import torch

    if not is_sharded(path):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        return {k.removeprefix("model."): v for k, v in state.items()}
    import torch.distributed.checkpoint as dcp

    fqns = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    # ModelParallelStrategy (FSDP2) saves {"state_dict": ...}, FSDPStrategy {"model": ...}; inside, the
    # LightningModule's names: "model.<transformers name>"
    top = next((t for t in ("state_dict", "model") if any(f.startswith(f"{t}.model.") for f in fqns)), None)
    if top is None:
        raise CheckpointError(f"{path} is a sharded checkpoint without model weights (no state_dict.model.*)")
    prefix = f"{top}.model."
    saved = {f.removeprefix(prefix): tuple(md.size) for f, md in fqns.items() if f.startswith(prefix) and hasattr(md, "size")}
    loadable = {k: v for k, v in like.items() if k in saved and tuple(v.shape) == saved[k]}
    dcp.load({top: {f"model.{k}": v for k, v in loadable.items()}}, checkpoint_id=path, no_dist=True)
    return {k: loadable[k] if k in loadable else torch.empty(shape, device="meta") for k, shape in saved.items()}
