"""The task encoder: one record (images + conversation) to model inputs, and batches of them.

Every `<image>` marker becomes exactly as many image tokens as the model will produce for
that image (anyres tiles, unpadding and row newlines, as transformers computes them), so a
forward pass never meets a token/feature mismatch. Labels are -100 everywhere except on
assistant answers and their end-of-turn token.

Truncation policy: an over-long sample loses text from its end, never part of an image; a
sample whose cut would fall inside (or before) its last image's tokens, or leave no trained
token, is dropped as a bad sample with that reason. Both are counted (`Encoded.truncated`,
the bad-sample counters of the datamodule).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from llavanext.data.images import ImageProcessor, select_best_resolution
from llavanext.data.templates import IMAGE, Template
from llavanext.errors import DataError

IGNORE = -100


def has_class_token(model_cfg: DictConfig) -> bool:
    """CLIP's towers put a class token before the patches; SigLIP's do not."""
    return str(model_cfg.vision.model_type).startswith("clip")


def image_token_count(height: int, width: int, model_cfg: DictConfig) -> int:
    """How many features LLaVA-NeXT produces for an image of this size (base + unpadded tiles + newlines)."""
    tile = model_cfg.vision.image_size
    patches = tile // model_cfg.vision.patch_size
    best_h, best_w = select_best_resolution((height, width), model_cfg.image_grid_pinpoints)
    current_h, current_w = patches * (best_h // tile), patches * (best_w // tile)
    if width / height > current_w / current_h:
        new_height = int(round(height * (current_w / width), 7))
        current_h -= 2 * ((current_h - new_height) // 2)
    else:
        new_width = int(round(width * (current_h / height), 7))
        current_w -= 2 * ((current_w - new_width) // 2)
    class_token = model_cfg.vision_feature_select_strategy == "full" and has_class_token(model_cfg)
    base = patches * patches + (1 if class_token else 0)
    return current_h * current_w + current_h + base


def tile_count(height: int, width: int, model_cfg: DictConfig) -> int:
    """Tiles the vision tower encodes for an image: the base view plus the anyres grid."""
    tile = model_cfg.vision.image_size
    best_h, best_w = select_best_resolution((height, width), model_cfg.image_grid_pinpoints)
    return 1 + (best_h // tile) * (best_w // tile)


@dataclass
class Encoded:
    input_ids: torch.Tensor                    # (seq,)
    labels: torch.Tensor                       # (seq,)
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per image (tiles, 3, H, W)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    # bad records this sample's slot stood in for (id, file, reason lines; see datamodule.Guard)
    bad: list[str] = field(default_factory=list)
    # read in place of a bad record: the batch drops it (it has a slot of its own in the epoch)
    # unless nothing else is left in the batch
    stand_in: bool = False


@dataclass
class TextEncoded:
    input_ids: list[int]
    labels: list[int]
    text_tokens: int
    image_tokens: int
    truncated: bool


class TaskEncoder:
    def __init__(self, tokenizer, template: Template, model_cfg: DictConfig, seq_length: int,
                 image_token_id: int):
        self.tokenizer = tokenizer
        self.template = template
        self.model_cfg = model_cfg
        self.seq_length = seq_length
        self.image_token_id = image_token_id
        self.image_processor = ImageProcessor(model_cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def encode_text(self, conversations, image_sizes, *, generation: bool = False) -> TextEncoded:
        """Token ids and labels from the conversation and the images' (height, width) alone.

        The rendered conversation is tokenised in one piece (the tokens the model meets at
        inference); each token is trained when it starts inside an assistant segment.
        """
        segments = self.template.render(conversations, generation=generation)
        text = "".join(s.text for s in segments)
        markers = text.count(IMAGE)
        if markers != len(image_sizes):
            raise DataError(f"{markers} <image> marker(s) but {len(image_sizes)} image(s)")
        trained_spans, start = [], 0
        for s in segments:
            if s.trained:
                trained_spans.append((start, start + len(s.text)))
            start += len(s.text)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        counts = [image_token_count(h, w, self.model_cfg) for h, w in image_sizes]
        ids, labels = [], []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE)
        span = 0
        images_seen = 0
        for token, (begin, _) in zip(enc["input_ids"], enc["offset_mapping"]):
            if token == self.image_token_id:
                if images_seen == len(counts):
                    raise DataError("the text holds more image tokens than <image> markers")
                ids += [token] * counts[images_seen]
                labels += [IGNORE] * counts[images_seen]
                images_seen += 1
                continue
            while span < len(trained_spans) and trained_spans[span][1] <= begin:
                span += 1
            trained = span < len(trained_spans) and trained_spans[span][0] <= begin
            ids.append(token)
            labels.append(token if trained else IGNORE)
        if images_seen != len(counts):
            raise DataError(f"{len(counts)} <image> marker(s) but the tokenizer found {images_seen}")
        image_tokens = sum(counts)
        text_tokens = len(ids) - image_tokens
        ids, labels, truncated = self.truncate(ids, labels, generation)
        return TextEncoded(ids, labels, text_tokens, image_tokens, truncated)

    def encode(self, conversations, images=(), *, generation: bool = False) -> Encoded:
        """One record: its conversation (LLaVA or OpenAI turns) and its PIL images in marker order."""
        sizes = [(im.height, im.width) for im in images]
        text = self.encode_text(conversations, sizes, generation=generation)
        pixel_values = [self.image_processor(image) for image in images]
        return Encoded(torch.tensor(text.input_ids), torch.tensor(text.labels), pixel_values, sizes, text.truncated)

    def truncate(self, ids, labels, generation):
        if len(ids) <= self.seq_length:
            return ids, labels, False
        image_tokens = ids.count(self.image_token_id)
        last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
        if last_image >= self.seq_length or generation:
            raise DataError(f"too long: {len(ids)} tokens, {image_tokens} of them image tokens, do not fit "
                            f"seq_length={self.seq_length} without cutting an image")
        if all(label == IGNORE for label in labels[: self.seq_length]):
            raise DataError(f"too long: truncating {len(ids)} tokens to seq_length={self.seq_length} "
                            "would leave no trained token")
        return ids[: self.seq_length], labels[: self.seq_length], True


def stack_images(samples: list[Encoded], out: dict) -> dict:
    """pixel_values (images, max tiles, 3, H, W) zero-padded on tiles, image_sizes (images, 2), in token order."""
    images = [pv for s in samples for pv in s.pixel_values]
    if images:
        tiles = max(pv.shape[0] for pv in images)
        pixel_values = images[0].new_zeros((len(images), tiles, *images[0].shape[1:]))
        for i, pv in enumerate(images):
            pixel_values[i, : pv.shape[0]] = pv
        out["pixel_values"] = pixel_values
        out["image_sizes"] = torch.tensor([size for s in samples for size in s.image_sizes])
    return out


def stats(samples: list[Encoded], out: dict, bad: list[str] | None = None) -> dict:
    """Counters the datamodule takes off the batch before it reaches the model (see DataModule)."""
    out["data_stats"] = {"samples": len(samples), "truncated": sum(s.truncated for s in samples),
                         "bad": [line for s in samples for line in s.bad] if bad is None else bad}
    return out


def collate(samples: list[Encoded], pad_id: int) -> dict:
    """Right-padded batch in the layout LlavaNextForConditionalGeneration takes."""
    length = max(len(s.input_ids) for s in samples)
    batch = len(samples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    labels = torch.full((batch, length), IGNORE, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s.input_ids)
        input_ids[i, :n] = s.input_ids
        labels[i, :n] = s.labels
        attention_mask[i, :n] = 1
    out = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    return stack_images(samples, out)


def pack(samples: list[Encoded], pad_id: int, pack_length: int) -> dict:
    """Several samples per row, attention kept inside each sample by its position ids.

    The packed batch (R rows, usually 1):
      input_ids     (R, T) long   samples back to back, rows padded to the longest row T
      position_ids  (R, T) long   0, 1, ... restarting at every sample (and for the padding tail)
      labels        (R, T) long   each sample's own labels; -100 on padding and on each sample's
                                  first token (unpacked, no token predicts it either)
      pixel_values  (images, tiles, 3, H, W), image_sizes (images, 2): in the order the images'
                    tokens appear when the rows are read one after another
    There is no attention_mask: transformers' masking utils (create_causal_mask) read the
    restarts of position_ids as sequence boundaries when attention_mask is None and no cache
    is used (the module passes use_cache=False), so no token attends across samples.
    Rows are filled first-fit in sample order, each holding at most `pack_length` tokens.
    """
    rows: list[list[Encoded]] = []
    room: list[int] = []
    for s in samples:
        n = len(s.input_ids)
        for r, free in enumerate(room):
            if n <= free:
                rows[r].append(s)
                room[r] -= n
                break
        else:
            rows.append([s])
            room.append(pack_length - n)
    length = max(pack_length - free for free in room)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[r, at:at + n] = s.input_ids
            labels[r, at:at + n] = s.labels
            labels[r, at] = IGNORE  # never predicted from the previous sample's last token
            position_ids[r, at:at + n] = torch.arange(n)
            at += n
        position_ids[r, at:] = torch.arange(length - at)
    out = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
    return stack_images([s for row in rows for s in row], out)
