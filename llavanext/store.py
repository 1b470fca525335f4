"""The model store: imported checkpoints under `$LLAVANEXT_HOME/models/<org>/<name>/`.

Each entry is a Hugging Face folder that transformers loads as it is, plus `llavanext.yaml`
(kind, the model group it fits, where it came from). An entry appears whole or not at all:
it is written into a hidden folder beside it and renamed into place.

Only the standard library and omegaconf are imported here, so `llavanext import --list` is quick.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from llavanext.errors import CheckpointError

META = "llavanext.yaml"
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
HF_PREFIX = "hf://"
# What a download fetches: configs, safetensors, tokenizer and processor files (no pickles, no code)
DOWNLOAD = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.md", "LICENSE*"]


def home() -> Path:
    return Path(os.environ.get("LLAVANEXT_HOME") or Path.home() / ".cache" / "llavanext").expanduser()


def models_dir() -> Path:
    return home() / "models"


def check_name(name: str) -> str:
    if not NAME.match(name) or ".." in name:
        raise CheckpointError(f"store name {name!r} is not of the form org/name (letters, digits, . _ -)")
    return name


def entry_dir(name: str) -> Path:
    return models_dir() / check_name(name)


def split_hf(source: str) -> tuple[str, str | None]:
    """`hf://org/name[@revision]` -> (repo id, revision)."""
    repo, _, revision = source.removeprefix(HF_PREFIX).partition("@")
    if not NAME.match(repo):
        raise CheckpointError(f"{source!r} is not of the form hf://org/name[@revision]")
    return repo, revision or None


def hf_snapshot(source: str, allow_patterns: list[str] = DOWNLOAD) -> Path:
    """The folder of `hf://org/name[@rev]` in the local Hugging Face cache; downloaded only where a network is."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, revision = split_hf(source)
    try:
        return Path(snapshot_download(repo, revision=revision, local_files_only=True))
    except LocalEntryNotFoundError:
        if constants.HF_HUB_OFFLINE:
            raise CheckpointError(
                f"{source} is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE is "
                f"set: download it where a network exists (`hf download {repo}`) and copy the cache here") from None
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        raise CheckpointError(f"cannot fetch {source}: it is not in the local Hugging Face cache "
                              f"({constants.HF_HUB_CACHE}) and the Hub said: {str(e).splitlines()[0]}") from None


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The folder of a store name (`org/name`), an `hf://org/name[@rev]` or a local folder."""
    text = str(name_or_path)
    if text.startswith(HF_PREFIX):
        return hf_snapshot(text)
    if NAME.match(text) and (models_dir() / text).is_dir():  # half-written entries are hidden, never matched
        return models_dir() / text
    path = Path(text).expanduser()
    if path.is_dir():
        return path
    raise CheckpointError(
        f"{text!r}: no model of that name in the store ({models_dir()}), and neither an hf://org/name nor a folder. "
        "`llavanext import --list` shows the store; `llavanext import source=...` adds to it")


def read_meta(entry: Path) -> dict:
    """An entry's llavanext.yaml ({} for a HF folder put into the store by hand)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(entry / META)) if (entry / META).is_file() else {}


def entries() -> list[tuple[str, dict]]:
    """(name, llavanext.yaml) of every entry; half-written imports are hidden folders, not entries."""
    return [(f"{entry.parent.name}/{entry.name}", read_meta(entry)) for entry in sorted(models_dir().glob("*/*"))
            if entry.is_dir() and not entry.name.startswith(".") and not entry.parent.name.startswith(".")]


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def print_entries() -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # piped (grep, a log): whole names rather than a terminal-width table
    found = entries()
    if not found:
        console.print(f"the model store {models_dir()} is empty: `llavanext import source=hf://org/name` adds to it")
        return
    table = Table(title=f"Models in {models_dir()}", title_justify="left")
    for column in ("name", "kind", "fits model=", "source", "revision", "size", "imported"):
        table.add_column(column, justify="right" if column == "size" else "left", overflow="fold")
    for name, meta in found:
        size = folder_size(models_dir() / name) / 2**30
        table.add_row(name, meta.get("kind", "?"), meta.get("model_group") or "-", str(meta.get("source", "?")),
                      str(meta.get("revision") or "-")[:12], f"{size:.2f} GiB", str(meta.get("imported", "?")))
    console.print(table)


def new_temp_entry(name: str) -> Path:
    """A hidden folder beside the entry to write into; leftovers of killed imports of this name are removed."""
    target = entry_dir(name)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in sorted(target.parent.glob(f".{target.name}.*-*-*")):
        pid = stale.name.rsplit("-", 2)[-2]
        if pid.isdigit() and pid_alive(int(pid)):
            continue
        if ".old-" in stale.name and not target.exists():
            os.replace(stale, target)  # killed between the two renames of commit_entry: put the old one back
        else:
            shutil.rmtree(stale, ignore_errors=True)
    temp = target.parent / f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp.mkdir()
    return temp


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def commit_entry(temp: Path, name: str) -> Path:
    """Move a finished temp folder into place; an existing entry is swapped out only after the new one is whole."""
    target = entry_dir(name)
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(temp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return target
