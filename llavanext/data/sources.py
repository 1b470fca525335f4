"""Datasets: LLaVA conversation JSON with an image folder, the bundled demo, and a synthetic mock."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from omegaconf import DictConfig

from llavanext.data.encoder import IGNORE, Encoded, TaskEncoder, image_token_count, select_best_resolution
from llavanext.errors import DataError


def read_records(path: str | Path) -> list[dict]:
    """A JSON list or JSONL of LLaVA records."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not JSON ({e.msg})") from None
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
        from PIL import Image, UnidentifiedImageError

        images = []
        for rel in image_paths(record):
            path = self.image_root / rel
            try:
                with Image.open(path) as im:
                    images.append(im.convert("RGB"))
            except FileNotFoundError:
                raise DataError(f"image {path} does not exist") from None
            except (UnidentifiedImageError, OSError) as e:
                raise DataError(f"image {path} cannot be read ({e})") from None
        return images

    def __getitem__(self, index) -> Encoded:
        record = self.records[index]
        try:
            return self.encoder.encode(record["conversations"], self.load_images(record))
        except (DataError, KeyError) as e:
            where = f"{self.source} record {record.get('id', index)!r}"
            raise DataError(f"{where}: {e}") from None


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
