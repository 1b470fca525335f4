"""Map-style datasets over the record sources: LLaVA JSON, `datasets` folders, a weighted mix, mock.

Every source turns a record into (id, conversation, PIL images) and hands it to the one
TaskEncoder, so the same record gives the same encoded sample whatever file format held it.
A record that cannot be used raises DataError naming its source, id and reason; the
datamodule's Guard decides what happens next (data.on_bad_sample).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from llavanext.data.encoder import IGNORE, Encoded, TaskEncoder, image_token_count
from llavanext.data.images import select_best_resolution
from llavanext.errors import DataError

BAD = "__bad__"  # a record that failed before encoding (unreadable line): its reason


def read_records(path: str | Path) -> list[dict]:
    """A JSON list or JSONL of LLaVA records.

    Bytes that are not UTF-8 are kept as lone surrogates, so the record holding them is
    reported bad (non-UTF-8 text) instead of failing the whole file; a JSONL line that is not
    JSON becomes a bad record of its own.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    records.append({"id": f"line {n}", BAD: f"not JSON ({e.msg})"})
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(records).__name__}")
    return records


def image_paths(record: dict) -> list[str]:
    image = record.get("image", record.get("images"))
    if image is None:
        return []
    return [image] if isinstance(image, str) else list(image)


def open_image(source, name: str):
    """A decoded RGB PIL image from a path or bytes; DataError naming `name` when it cannot be."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {name} does not exist") from None
    except Exception as e:  # PIL raises many kinds (OSError, SyntaxError, DecompressionBombError, ...)
        raise DataError(f"image {name} cannot be read ({type(e).__name__}: {e})") from None


def record_id(record, index) -> str:
    return str(record.get("id", index)) if isinstance(record, dict) else str(index)


def llava_conversations(record) -> list:
    """A LLaVA record's conversation turns, or DataError naming what makes the record unusable."""
    if not isinstance(record, dict):
        raise DataError("record is not a JSON object")
    if BAD in record:
        raise DataError(record[BAD])
    if "conversations" not in record:
        raise DataError("no 'conversations'")
    return record["conversations"]


class LlavaJsonDataset(torch.utils.data.Dataset):
    """LLaVA's format: `{id, image, conversations: [{from, value}]}`, images relative to `image_root`."""

    def __init__(self, records: list[dict], image_root: str | Path, encoder: TaskEncoder, source: str = ""):
        self.records = records
        self.image_root = Path(image_root)
        self.encoder = encoder
        self.source = source

    def __len__(self):
        return len(self.records)

    def load_images(self, record):
        return [open_image(self.image_root / rel, str(self.image_root / rel)) for rel in image_paths(record)]

    def __getitem__(self, index) -> Encoded:
        record = self.records[index]
        try:
            return self.encoder.encode(llava_conversations(record), self.load_images(record))
        except DataError as e:
            raise DataError(f"{self.source} record {record_id(record, index)!r}: {e}") from None


def load_hf(path: str, *, split: str = "train", streaming: bool = False):
    """A `datasets` dataset from a local folder or file: saved with save_to_disk, parquet, JSON(L) or imagefolder."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise DataError(f"data.path={path} does not exist")
    try:
        if (p / "dataset_info.json").is_file() and (p / "state.json").is_file():
            ds = datasets.load_from_disk(str(p))
            return ds.to_iterable_dataset() if streaming else ds
        if p.is_file():
            kind = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}.get(p.suffix)
            if kind is None:
                raise DataError(f"data.path={path}: a file must be .parquet, .json or .jsonl")
            return datasets.load_dataset(kind, data_files=str(p), split=split, streaming=streaming)
        return datasets.load_dataset(str(p), split=split, streaming=streaming)
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"data.path={path}: `datasets` cannot load it ({str(e).splitlines()[0]})") from None


def raw_images(ds):
    """Image columns as undecoded {bytes, path}: decoding happens per sample, where a bad image is one bad record."""
    import datasets

    features = ds.features or {}
    for column in ("images", "image"):
        feature = features.get(column)
        if isinstance(feature, datasets.Image):
            ds = ds.cast_column(column, datasets.Image(decode=False))
        elif isinstance(getattr(feature, "feature", None), datasets.Image):
            ds = ds.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return ds


def hf_sample(row: dict, index, encoder: TaskEncoder, root: Path, source: str) -> Encoded:
    """One `datasets` row: `messages` or `conversations` turns, `images` (or `image`) as images, bytes or paths."""
    rid = row.get("id", index)
    try:
        conversations = row.get("messages", row.get("conversations"))
        if conversations is None:
            raise DataError("no 'messages' or 'conversations' column")
        images = row.get("images", row.get("image"))
        images = [] if images is None else images if isinstance(images, list) else [images]
        loaded = []
        for n, image in enumerate(images):
            if isinstance(image, dict):  # datasets.Image(decode=False)
                data, name = image.get("bytes"), image.get("path") or f"image {n}"
                loaded.append(open_image(data if data is not None else root / name, str(name)))
            elif isinstance(image, str):
                loaded.append(open_image(root / image, str(root / image)))
            elif hasattr(image, "convert"):
                loaded.append(image.convert("RGB"))
            else:
                raise DataError(f"image {n} is a {type(image).__name__}, not an image, bytes or a path")
        return encoder.encode(conversations, loaded)
    except DataError as e:
        raise DataError(f"{source} record {rid!r}: {e}") from None


class HFDataset(torch.utils.data.Dataset):
    """A map-style `datasets` dataset (see `hf_sample` for the columns)."""

    def __init__(self, ds, encoder: TaskEncoder, root: str | Path, source: str):
        self.ds = raw_images(ds)
        self.encoder = encoder
        self.root = Path(root)
        self.source = source

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, index) -> Encoded:
        return hf_sample(self.ds[int(index)], index, self.encoder, self.root, self.source)


class HFStream(torch.utils.data.IterableDataset):
    """A streaming `datasets` dataset: each rank reads its own shard (split_dataset_by_node), each
    DataLoader worker its own files (datasets splits shards over workers). A bad record is
    skipped and reported with the next good sample."""

    def __init__(self, ds, encoder: TaskEncoder, root: str | Path, source: str, rank: int = 0, world_size: int = 1):
        from datasets.distributed import split_dataset_by_node

        self.ds = split_dataset_by_node(raw_images(ds), rank=rank, world_size=world_size)
        self.encoder = encoder
        self.root = Path(root)
        self.source = source

    def __iter__(self):
        bad = []
        for index, row in enumerate(self.ds):
            try:
                sample = hf_sample(row, index, self.encoder, self.root, self.source)
            except DataError as e:
                bad.append(str(e))
                continue
            sample.bad, bad = bad, []
            yield sample


class MixDataset(torch.utils.data.Dataset):
    """Several map-style datasets drawn with weights into one index space.

    Index i picks its source from a seeded draw with probabilities `weights`; the k-th pick of
    a source reads its k-th element of a seeded permutation (cycling when a small source is
    upsampled), so the mix is fixed by the seed and any sampler can shard and resume it.
    """

    def __init__(self, datasets: list, weights: list[float], seed: int, length: int | None = None):
        if len(datasets) != len(weights) or not datasets:
            raise DataError("data.sources: give each source a weight")
        total = float(sum(weights))
        if total <= 0 or any(w < 0 for w in weights):
            raise DataError(f"data.sources weights {list(weights)} must be >= 0 and not all 0")
        self.datasets = datasets
        length = length or sum(len(d) for d in datasets)
        rng = np.random.default_rng(seed)
        self.source = rng.choice(len(datasets), size=length, p=[w / total for w in weights])
        self.inner = np.zeros(length, dtype=np.int64)
        for s, d in enumerate(datasets):
            picks = np.flatnonzero(self.source == s)
            perm = rng.permutation(len(d))
            self.inner[picks] = perm[np.arange(len(picks)) % len(d)] if len(d) else 0

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index) -> Encoded:
        return self.datasets[self.source[index]][int(self.inner[index])]


class MockDataset(torch.utils.data.Dataset):
    """Synthetic tokens and images of the configured sizes, like NeMo's MockDataModule.

    Each sample: BOS, a masked prompt, one image's tokens, a trained answer. Sizes are drawn
    per index from `seed`, so a sample is the same wherever and whenever it is read.
    """

    def __init__(self, cfg: DictConfig, model_cfg: DictConfig, image_token_id: int, vocab_size: int):
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size

    def __len__(self):
        return self.cfg.num_samples

    def __getitem__(self, index) -> Encoded:
        rng = random.Random(self.cfg.seed * 1_000_003 + index)
        height, width = rng.choice([tuple(s) for s in self.cfg.image_sizes])
        text_tokens = rng.randint(*self.cfg.text_tokens)
        answer = max(1, int(text_tokens * self.cfg.answer_fraction))
        prompt = text_tokens - answer
        gen = torch.Generator().manual_seed(rng.getrandbits(31))
        low = 5  # below: special tokens of every tokenizer we ship
        words = torch.randint(low, self.vocab_size, (text_tokens,), generator=gen)
        words[words == self.image_token_id] = low
        n_image = image_token_count(height, width, self.model_cfg)
        ids = torch.cat([torch.tensor([1]), words[:prompt], torch.full((n_image,), self.image_token_id),
                         words[prompt:]])
        labels = ids.clone()
        labels[: 1 + prompt + n_image] = IGNORE
        tile = self.model_cfg.vision.image_size
        best_h, best_w = select_best_resolution((height, width), self.model_cfg.image_grid_pinpoints)
        tiles = (best_h // tile) * (best_w // tile) + 1
        pixels = torch.randn((tiles, 3, tile, tile), generator=gen)
        return Encoded(ids, labels, [pixels], [(height, width)])
