"""The Lightning datamodule: picks the source named by `data.source`, encodes, batches."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from llavanext.data.encoder import TaskEncoder, collate
from llavanext.data.sampler import ResumableSampler
from llavanext.data.sources import LlavaJsonDataset, MockDataset, read_records
from llavanext.data.templates import get_template
from llavanext.errors import ConfigError, DataError

log = logging.getLogger(__name__)
SOURCES = ("demo", "llava_json", "mock")


class SkipBadSamples(torch.utils.data.Dataset):
    """`data.on_bad_sample=skip`: a record that cannot be encoded is logged and left out of its batch."""

    def __init__(self, dataset, on_bad_sample: str):
        self.dataset = dataset
        self.on_bad_sample = on_bad_sample

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        try:
            return self.dataset[index]
        except DataError as e:
            if self.on_bad_sample == "error":
                raise
            log.warning("skipping bad sample: %s", e)
            return None


def collate_good(samples, pad_id):
    good = [s for s in samples if s is not None]
    if not good:
        raise DataError("every sample of a batch was bad; see the warnings above")
    return collate(good, pad_id)


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
        self.train_set = self.val_set = None
        self.seed = seed
        self.position = None  # the training sampler's state from a checkpoint

    def json_dataset(self, path, image_root, name):
        return LlavaJsonDataset(read_records(path), image_root, self.encoder, source=str(name))

    def setup(self, stage=None):
        if self.train_set is not None:
            return
        cfg = self.cfg
        if cfg.source == "mock":
            self.train_set = MockDataset(cfg, self.model_cfg, self.image_token_id, self.vocab_size)
            self.val_set = None
        elif cfg.source == "demo":
            from llavanext.demo.shapes import ensure_dataset

            root = ensure_dataset(cfg.num_train, cfg.num_val, cfg.seed)
            train_file = root / ("captions.json" if cfg.split == "pretrain" else "train.json")
            self.train_set = self.json_dataset(train_file, root, train_file)
            self.val_set = self.json_dataset(root / "val.json", root, root / "val.json")
        else:
            image_root = cfg.image_root or Path(cfg.path).parent
            self.train_set = self.json_dataset(cfg.path, image_root, cfg.path)
            self.val_set = self.json_dataset(cfg.val_path, image_root, cfg.val_path) if cfg.get("val_path") else None

    def loader(self, dataset, shuffle):
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        sampler = ResumableSampler(len(dataset), seed=self.seed, rank=rank, world_size=world, shuffle=shuffle)
        if shuffle and self.position:
            sampler.load_state_dict(self.position)
        return torch.utils.data.DataLoader(
            SkipBadSamples(dataset, self.cfg.on_bad_sample), batch_size=self.cfg.micro_batch_size,
            sampler=sampler, num_workers=self.cfg.num_workers, collate_fn=partial(collate_good, pad_id=self.pad_id),
            persistent_workers=self.cfg.num_workers > 0, drop_last=shuffle,
            generator=torch.Generator().manual_seed(self.seed))  # leaves the global RNG to the model

    def state_dict(self):
        """The data position, stored by Lightning in every checkpoint.

        Lightning resumes its batch count at the batches it had processed in this epoch when the
        checkpoint was written; the sampler skips exactly the samples those batches held.
        """
        if self.trainer is None:
            return {}
        batches = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"seed": self.seed, "epoch": self.trainer.current_epoch,
                "consumed": batches * self.cfg.micro_batch_size * self.trainer.world_size}

    def load_state_dict(self, state):
        self.position = state or None

    def train_dataloader(self):
        return self.loader(self.train_set, shuffle=True)

    def val_dataloader(self):
        return self.loader(self.val_set, shuffle=False) if self.val_set is not None else []
