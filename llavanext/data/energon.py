"""megatron-energon: LLaVA conversations in WebDataset shards, read with energon's own loaders.

On disk (what `llavanext data prepare` writes; energon's `CrudeWebdataset`): one sample per
record, grouped by key in `shards/*.tar`:
  <key>.json      {"id", "conversations": [{from, value}, ...], "images": ["img0.png", ...]}
  <key>.img0.png  the record's images, original bytes and extension (img1.jpg, ...)
Energon has no multi-turn conversation sample type, so the cooker below (its recommended way
for custom formats) turns a crude sample into a `ConversationSample`, and the task encoder
hands it to llavanext's one TaskEncoder. Energon owns sharding over ranks and workers,
shuffling, and the savable data position (`save_state_rank` / `restore_state_rank`).

Needs the optional extra: `pip install llavanext[energon]`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from omegaconf import DictConfig

from llavanext.data.encoder import Encoded, TaskEncoder
from llavanext.data.sources import open_image
from llavanext.errors import ConfigError, DataError

try:
    from megatron.energon import (
        Cooker,
        DefaultTaskEncoder,
        Sample,
        SkipSample,
        WorkerConfig,
        basic_sample_keys,
        get_savable_loader,
        get_train_dataset,
        get_val_dataset,
        stateless,
    )
except ImportError as e:  # a user mistake (missing extra), told plainly
    raise ConfigError("data=energon needs megatron-energon: pip install 'llavanext[energon]'") from e


@dataclass
class ConversationSample(Sample):
    """One LLaVA record: its id, its turns and its images (raw bytes with their member names)."""

    id: str
    conversations: list
    images: list  # [(name, bytes)] in <image> marker order
    problem: str | None = None  # why the .json member could not be read


@stateless
def cook_conversation(crude: dict) -> ConversationSample:
    key = crude.get("__key__", "?")
    problem = None
    try:  # bytes that are not UTF-8 are kept, as every other source does: the encoder reports that record
        raw = crude["json"]
        meta = json.loads(raw.decode("utf-8", errors="surrogateescape") if isinstance(raw, bytes) else raw)
    except KeyError:
        meta, problem = {}, "no .json member"
    except ValueError as e:
        meta, problem = {}, f"unreadable .json ({e})"
    if not isinstance(meta, dict):
        meta, problem = {}, f"the .json member is a {type(meta).__name__}, not a record"
    images = [(name, crude.get(name)) for name in meta.get("images", [])]
    return ConversationSample(**basic_sample_keys(crude), id=str(meta.get("id", key)),
                              conversations=meta.get("conversations"), images=images, problem=problem)


class EnergonEncoder(DefaultTaskEncoder):
    """energon's task encoder around llavanext's: bad samples are skipped and reported in the next batch."""

    cookers = [Cooker(cook_conversation)]
    decoder = None  # images are decoded in encode_sample, where a corrupt one is one bad record

    def __init__(self, encoder: TaskEncoder, batcher, source: str):
        super().__init__()
        self.encoder = encoder
        self.batcher = batcher
        self.source = source
        self.bad: list[str] = []

    @stateless
    def encode_sample(self, sample: ConversationSample) -> Encoded:
        where = f"{self.source} record {sample.id!r} ({sample.__key__})"
        try:
            if sample.problem:
                raise DataError(sample.problem)
            images = []
            for name, data in sample.images:
                if data is None:
                    raise DataError(f"image {name} is missing from the shard")
                images.append(open_image(data, name))
            return self.encoder.encode(sample.conversations, images)
        except DataError as e:
            self.bad.append(f"{where}: {e}")
            raise SkipSample() from None

    @stateless
    def batch(self, samples: list[Encoded]) -> dict:
        samples[0].bad, self.bad = self.bad + samples[0].bad, []
        return self.batcher(samples)

    @stateless
    def encode_batch(self, batch: dict) -> dict:
        return batch


def worker_config(num_workers: int) -> WorkerConfig:
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return WorkerConfig.default_worker_config(num_workers)
    return WorkerConfig(rank=0, world_size=1, num_workers=num_workers)


def energon_loader(cfg: DictConfig, encoder: TaskEncoder, batcher, split: str):
    """energon's savable loader over `data.path` (a prepared dataset or a metadataset YAML)."""
    from pathlib import Path

    if not Path(cfg.path).exists():
        raise DataError(f"data.path={cfg.path} does not exist")
    common = dict(worker_config=worker_config(cfg.num_workers), batch_size=cfg.micro_batch_size,
                  task_encoder=EnergonEncoder(encoder, batcher, str(cfg.path)))
    if split == "train":
        ds = get_train_dataset(cfg.path, split_part="train", shuffle_buffer_size=cfg.shuffle_buffer_size,
                               max_samples_per_sequence=cfg.max_samples_per_sequence,
                               repeat=cfg.get("repeat", True), **common)
    else:
        ds = get_val_dataset(cfg.path, split_part="val", **common)
    return get_savable_loader(ds)


class PositionedLoader:
    """energon's savable loader, remembering its position before each batch it hands out.

    Lightning fetches a batch ahead of the one it trains on (this loader has no length, energon's
    being an estimate), so the loader's own position at checkpoint time is a batch too far: `position(trained)` gives the position after exactly
    `trained` batches (the count Lightning stores), so a resumed run reads the next unseen batch.
    """

    KEEP = 8  # positions remembered: Lightning is at most a batch or two ahead

    def __init__(self, loader, start: int = 0):
        self.loader = loader
        self.handed_out = start
        self.before: dict[int, object] = {}

    def __iter__(self):
        batches = iter(self.loader)
        while True:
            position = self.loader.save_state_rank()
            try:
                batch = next(batches)
            except StopIteration:
                return
            self.before[self.handed_out] = position
            self.before.pop(self.handed_out - self.KEEP, None)
            self.handed_out += 1
            yield batch

    def position(self, trained: int | None = None):
        if trained is not None and trained in self.before:
            return self.before[trained]
        return self.loader.save_state_rank()
