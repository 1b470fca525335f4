"""The Lightning datamodule: builds the source named by `data.source`, encodes, batches, counts bad data.

Bad records never raise inside a DataLoader worker. The Guard fills a bad record's slot with
the next good record, which the Batcher drops again (that record has its own slot in the epoch,
so no sample is trained twice) unless the whole micro-batch was bad; the bad record's id, file
and reason travel along in the batch
(`data_stats`); the datamodule takes those counters off each batch in the main process
(`on_before_batch_transfer`), logs every bad record, and fails the run with one DataError when
`data.on_bad_sample=error` or when the bad fraction passes `data.max_bad_fraction`.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from llavanext.data.encoder import Encoded, TaskEncoder, collate, pack, stats
from llavanext.data.sampler import ResumableSampler
from llavanext.data.sources import (
    HFDataset,
    HFStream,
    LlavaJsonDataset,
    MixDataset,
    MockDataset,
    load_hf,
    read_records,
)
from llavanext.data.templates import get_template
from llavanext.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SOURCES = ("demo", "llava_json", "hf", "energon", "mix", "mock")
MAX_BAD_IN_A_ROW = 64
MIN_SEEN = 100  # the bad fraction is judged once this many samples (or the whole set) were seen


class Guard(torch.utils.data.Dataset):
    """A map-style dataset whose bad records are replaced by the next good one and reported."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index) -> Encoded:
        bad = []
        for step in range(MAX_BAD_IN_A_ROW):
            try:
                sample = self.dataset[(index + step) % len(self.dataset)]
            except DataError as e:
                bad.append(str(e))
                continue
            except Exception as e:  # a library failing on odd input is still one bad record, not a dead worker
                bad.append(f"record at index {(index + step) % len(self.dataset)}: {type(e).__name__}: {e}")
                continue
            sample.bad = bad + sample.bad
            sample.stand_in = step > 0
            return sample
        raise DataError(f"{MAX_BAD_IN_A_ROW} bad records in a row, the last: {bad[-1]}")


class Batcher:
    """collate_fn: a padded batch, or a packed one with data.packing (see encoder.pack), plus counters."""

    def __init__(self, pad_id: int, packing: bool, pack_length: int):
        self.pad_id, self.packing, self.pack_length = pad_id, packing, pack_length

    def __call__(self, samples: list[Encoded]) -> dict:
        bad = [line for s in samples for line in s.bad]
        samples = [s for s in samples if not s.stand_in] or samples[:1]  # an empty step would stall DDP
        batch = pack(samples, self.pad_id, self.pack_length) if self.packing else collate(samples, self.pad_id)
        return stats(samples, batch, bad)


class BadData:
    """Counts seen, bad and truncated samples in the main process and enforces the policy."""

    def __init__(self, on_bad_sample: str, max_bad_fraction: float, expected: int | None = None):
        if on_bad_sample not in ("skip", "error"):
            raise ConfigError(f"data.on_bad_sample={on_bad_sample!r}; choose skip or error")
        self.on_bad_sample = on_bad_sample
        self.max_bad_fraction = max_bad_fraction
        self.min_seen = min(MIN_SEEN, expected) if expected else MIN_SEEN
        self.seen = self.bad = self.truncated = 0

    def update(self, data_stats: dict) -> None:
        bad = data_stats["bad"]
        self.seen += data_stats["samples"] + len(bad)
        self.bad += len(bad)
        self.truncated += data_stats["truncated"]
        for line in bad:
            log.warning("bad sample skipped: %s", line)
        if bad and self.on_bad_sample == "error":
            raise DataError(f"bad sample (data.on_bad_sample=error): {bad[0]}")
        if self.seen >= self.min_seen and self.bad > self.max_bad_fraction * self.seen:
            raise DataError(f"{self.bad} of {self.seen} samples were bad ({self.bad / self.seen:.1%}), more than "
                            f"data.max_bad_fraction={self.max_bad_fraction}; the last: {bad[-1] if bad else '-'}. "
                            "`llavanext data check` lists them all.")

    def summary(self) -> str:
        return (f"data: {self.seen} samples read, {self.bad} bad (skipped), {self.truncated} truncated "
                "(text cut from the end; samples whose images do not fit are bad)")


class DataModule(L.LightningDataModule):
    def __init__(self, cfg: DictConfig, model_cfg: DictConfig, tokenizer, template: str,
                 image_token_id: int, vocab_size: int, seed: int = 0):
        super().__init__()
        if cfg.source not in SOURCES:
            raise ConfigError(f"data.source={cfg.source!r}; choose from {', '.join(SOURCES)}")
        self.cfg = cfg
        self.model_cfg = model_cfg
        self.tokenizer = tokenizer
        self.image_token_id = image_token_id
        self.vocab_size = vocab_size
        self.encoder = None
        if tokenizer is not None:
            self.encoder = TaskEncoder(tokenizer, get_template(template), model_cfg, cfg.seq_length,
                                       image_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
        pack_length = cfg.get("pack_length") or cfg.seq_length
        self.batcher = Batcher(self.pad_id, bool(cfg.get("packing", False)), pack_length)
        self.train_set = self.val_set = None
        self.counters = BadData(cfg.on_bad_sample, cfg.get("max_bad_fraction", 0.01))
        self.energon_loader = None
        self.pending_energon_state = None
        self.seed = seed
        self.position = None  # the training sampler's state from a checkpoint

    # -- building the sources -----------------------------------------------------------------
    def build(self, cfg: DictConfig, split: str):
        """The dataset of one source config for `train` or `val` (None when it has no such split)."""
        if cfg.source == "mock":
            return MockDataset(cfg, self.model_cfg, self.image_token_id, self.vocab_size) if split == "train" else None
        if cfg.source == "demo":
            from llavanext.demo.shapes import ensure_dataset

            root = ensure_dataset(cfg.num_train, cfg.num_val, cfg.seed)
            name = {"train": "captions.json" if cfg.split == "pretrain" else "train.json", "val": "val.json"}[split]
            return LlavaJsonDataset(read_records(root / name), root, self.encoder, source=str(root / name))
        if cfg.source == "llava_json":
            path = cfg.path if split == "train" else cfg.get("val_path")
            if not path:
                return None
            image_root = cfg.get("image_root") or Path(cfg.path).parent
            return LlavaJsonDataset(read_records(path), image_root, self.encoder, source=str(path))
        if cfg.source == "hf":
            hf_split = cfg.get("split", "train") if split == "train" else cfg.get("val_split")
            if not hf_split:
                return None
            root = cfg.get("image_root") or (cfg.path if Path(cfg.path).is_dir() else Path(cfg.path).parent)
            ds = load_hf(cfg.path, split=hf_split, streaming=bool(cfg.get("streaming", False)))
            if cfg.get("streaming", False):
                rank, world = distributed_rank()
                return HFStream(ds, self.encoder, root, cfg.path, rank, world)
            return HFDataset(ds, self.encoder, root, cfg.path)
        if cfg.source == "mix":
            parts = [self.build(merged(cfg, entry), split) for entry in cfg.sources]
            if split != "train" or any(p is None or isinstance(p, torch.utils.data.IterableDataset) for p in parts):
                if split == "train":
                    raise ConfigError("data.sources: mix map-style sources (llava_json, demo, hf without streaming, "
                                      "mock); energon datasets mix through an energon metadataset (data=energon)")
                return None
            return MixDataset(parts, [float(e.get("weight", 1.0)) for e in cfg.sources], cfg.get("seed", 0),
                              cfg.get("num_samples"))
        raise ConfigError(f"data.source={cfg.source!r} cannot be read as a dataset here")

    def setup(self, stage=None):
        if self.train_set is not None or self.cfg.source == "energon":
            return
        if self.encoder is None and self.cfg.source != "mock":
            raise ConfigError(f"data={self.cfg.name} needs a tokenizer")
        self.train_set = self.build(self.cfg, "train")
        self.val_set = self.build(self.cfg, "val")
        expected = len(self.train_set) if hasattr(self.train_set, "__len__") else None
        self.counters = BadData(self.cfg.on_bad_sample, self.cfg.get("max_bad_fraction", 0.01), expected)
        log.info("data: seq_length=%d, over-long samples lose text from the end; a sample whose image tokens "
                 "do not fit is skipped as bad%s", self.cfg.seq_length,
                 f"; packing up to {self.batcher.pack_length} tokens a row" if self.batcher.packing else "")

    # -- loaders ------------------------------------------------------------------------------
    def loader(self, dataset, shuffle: bool):
        """The one place a map-style or iterable dataset becomes a DataLoader (the sampler plugs in here)."""
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        sampler = None
        if not iterable:  # seeded, sharded by rank, resumable mid-epoch (Lightning's own sampler is off)
            rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
            sampler = ResumableSampler(len(dataset), seed=self.seed, rank=rank, world_size=world, shuffle=shuffle)
            if shuffle and self.position:
                sampler.load_state_dict(self.position)
        return torch.utils.data.DataLoader(
            dataset if iterable else Guard(dataset), batch_size=self.cfg.micro_batch_size, sampler=sampler,
            num_workers=self.cfg.num_workers, collate_fn=self.batcher,
            persistent_workers=self.cfg.num_workers > 0, drop_last=shuffle,
            generator=torch.Generator().manual_seed(self.seed))  # leaves the global RNG to the model

    def state_dict(self):
        """The data position of map-style sources, stored by Lightning in every checkpoint.

        Lightning resumes its batch count at the batches it had processed in this epoch when the
        checkpoint was written; the sampler skips exactly the samples those batches held.
        """
        if self.cfg.source == "energon":
            return self.energon_checkpoint_state()
        if self.trainer is None:
            return {}
        batches = self.trained_batches()
        return {"seed": self.seed, "epoch": self.trainer.current_epoch,
                "consumed": batches * self.cfg.micro_batch_size * self.trainer.world_size}

    def load_state_dict(self, state):
        if self.cfg.source == "energon":
            self.restore_energon_checkpoint_state(state)
            return
        self.position = state or None

    def trained_batches(self) -> int:
        """Batches Lightning has trained on in this epoch (restored from the checkpoint on resume)."""
        if self.trainer is None:
            return 0
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self):
        if self.cfg.source == "energon":
            from llavanext.data.energon import PositionedLoader, energon_loader

            loader = energon_loader(self.cfg, self.encoder, self.batcher, "train")
            if self.pending_energon_state is not None:
                loader.restore_state_rank(self.pending_energon_state)
                self.pending_energon_state = None
            self.energon_loader = PositionedLoader(loader, start=self.trained_batches())
            return self.energon_loader
        return self.loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        if self.cfg.source == "energon":
            if not self.cfg.get("val", True):
                return []
            from llavanext.data.energon import energon_loader

            return energon_loader(self.cfg, self.encoder, self.batcher, "val")
        return self.loader(self.val_set, shuffle=False) if self.val_set is not None else []

    def on_before_batch_transfer(self, batch, dataloader_idx):
        data_stats = batch.pop("data_stats", None)
        if data_stats is not None:
            self.counters.update(data_stats)
        return batch

    def teardown(self, stage=None):
        if self.counters.seen:
            log.info(self.counters.summary())

    # -- energon's data position (the lead wires these into state_dict/load_state_dict) -------
    def energon_state(self):
        """This rank's energon loader position after the batches trained so far."""
        if self.energon_loader is None:
            return None
        return self.energon_loader.position(self.trained_batches() if self.trainer is not None else None)

    def energon_checkpoint_state(self) -> dict:
        """Every rank's energon position, gathered, as bytes in a tensor: checkpoints load with
        weights_only=True, which takes tensors but not energon's state classes."""
        mine = self.energon_state()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        return {"energon_positions": torch.frombuffer(bytearray(pickle.dumps(states)), dtype=torch.uint8)}

    def restore_energon_checkpoint_state(self, state: dict) -> None:
        if not state or "energon_positions" not in state:
            return
        # our own checkpoint's data position, written by energon_checkpoint_state
        states = pickle.loads(state["energon_positions"].numpy().tobytes())
        rank, world = distributed_rank()
        if len(states) != world:
            raise DataError(f"the checkpoint holds the energon position of {len(states)} rank(s) but this run has "
                            f"{world}: resume with the same world size")
        self.restore_energon_state(states[rank])

    def restore_energon_state(self, state) -> None:
        """Continue from a saved position: applied when the train loader is (re)built, before iteration."""
        if self.energon_loader is not None:
            self.energon_loader.restore_state_rank(state)
        else:
            self.pending_energon_state = state


def merged(parent: DictConfig, entry: DictConfig) -> DictConfig:
    """A mix entry with the mix's shared settings (seq_length, seeds, ...) filled in."""
    from omegaconf import OmegaConf

    base = {k: v for k, v in OmegaConf.to_container(parent, resolve=True).items() if k not in ("sources", "source")}
    return OmegaConf.merge(OmegaConf.create(base), entry)


def distributed_rank() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1
