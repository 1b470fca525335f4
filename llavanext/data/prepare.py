"""`llavanext data prepare`: LLaVA JSON + image folder -> an energon dataset (WebDataset shards + .nv-meta).

Records are written in file order into `out/shards/{train,val}-NNNNNN.tar` (the layout is in
llavanext/data/energon.py), images as their original bytes. A record whose images are missing
or unreadable, or that is not a record at all, is left out and listed; more than
`data.max_bad_fraction` of them fails the command after the report, before `energon prepare`.
Then energon's own `prepare` indexes the shards (splits by file name, CrudeWebdataset).
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console

from llavanext.data.sources import image_paths, llava_conversations, read_records, record_id
from llavanext.errors import ConfigError, DataError

console = Console()


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # shards are byte-identical from run to run
    tar.addfile(info, io.BytesIO(data))


def record_members(record, index: int, image_root: Path) -> list[tuple[str, bytes]]:
    """The members of one record's sample (without the key), or DataError why it cannot be written."""
    from PIL import Image

    llava_conversations(record)
    members, names = [], []
    for n, rel in enumerate(image_paths(record)):
        path = image_root / rel
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                ext = (im.format or "png").lower().replace("jpeg", "jpg")
        except FileNotFoundError:
            raise DataError(f"image {path} does not exist") from None
        except Exception as e:
            raise DataError(f"image {path} cannot be read ({type(e).__name__}: {e})") from None
        names.append(f"img{n}.{ext}")
        members.append((names[-1], data))
    meta = {"id": record_id(record, index), "conversations": record["conversations"], "images": names}
    # surrogateescape keeps non-UTF-8 bytes of the source as they were: the reader reports that record
    text = json.dumps(meta, ensure_ascii=False).encode("utf-8", errors="surrogateescape")
    return [("json", text)] + members


def write_shards(records: list, image_root: Path, out: Path, shard_size: int, val_fraction: float):
    """Write the shards; returns (written per split, [(id, reason)] of records left out)."""
    shards = out / "shards"
    shards.mkdir(parents=True, exist_ok=True)
    val_every = round(1 / val_fraction) if val_fraction > 0 else 0
    tars, counts, bad = {}, {"train": 0, "val": 0}, []
    try:
        for index, record in enumerate(records):
            try:
                members = record_members(record, index, image_root)
            except DataError as e:
                bad.append((record_id(record, index), str(e)))
                continue
            split = "val" if val_every and index % val_every == val_every - 1 else "train"
            if counts[split] % shard_size == 0:
                if split in tars:
                    tars[split].close()
                tars[split] = tarfile.open(shards / f"{split}-{counts[split] // shard_size:06d}.tar", "w")
            key = f"{index:09d}"  # webdataset keys end at the first dot: LLaVA ids may hold dots
            for suffix, data in members:
                add_member(tars[split], f"{key}.{suffix}", data)
            counts[split] += 1
    finally:
        for tar in tars.values():
            tar.close()
    return counts, bad


def energon_prepare(out: Path, splits: list[str]) -> None:
    args = [sys.executable, "-c", "from megatron.energon.cli.main import main; main()", "prepare", str(out),
            "--non-interactive", "--force-overwrite", "--sample-type", "CrudeWebdataset", "--no-progress"]
    for split in splits:
        # energon brace-expands the pattern first, which eats backslashes: no \d or \. here
        args += ["--split-parts", f"{split}:shards/{split}-[0-9]+[.]tar"]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode:
        raise DataError(f"energon prepare {out} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


def run(cfg: DictConfig) -> Path:
    data = cfg.data
    if data.source != "llava_json":
        raise ConfigError(f"data prepare reads LLaVA JSON (data=llava_json), not data.source={data.source}")
    try:
        import megatron.energon  # noqa: F401
    except ImportError:
        raise ConfigError("data prepare needs megatron-energon: pip install 'llavanext[energon]'") from None
    out = Path(cfg.out)
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out={out} is not empty; choose another folder or pass overwrite=true")
    records = read_records(data.path)
    image_root = Path(data.image_root or Path(data.path).parent)
    counts, bad = write_shards(records, image_root, out, cfg.shard_size, cfg.val_fraction)
    total = len(records)
    console.print(f"{data.path}: {total} records, {counts['train']} train + {counts['val']} val written "
                  f"to {out / 'shards'}, {len(bad)} left out")
    for rid, reason in bad[:50]:
        console.print(f"  [red]bad[/] {rid}: {reason}", highlight=False)
    if len(bad) > 50:
        console.print(f"  ... and {len(bad) - 50} more")
    if total and len(bad) > data.max_bad_fraction * total:
        raise DataError(f"{len(bad)} of {total} records are bad ({len(bad) / total:.1%}), more than "
                        f"data.max_bad_fraction={data.max_bad_fraction}; no energon index was written")
    energon_prepare(out, [s for s in ("train", "val") if counts[s]])
    console.print(f"energon dataset ready: llavanext finetune data=energon data.path={out}")
    return out
