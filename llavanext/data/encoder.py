"""The task encoder: one record (images + conversation) to model inputs, and batches of them.

Every `<image>` marker becomes exactly as many image tokens as the model will produce for
that image (anyres tiles, unpadding and row newlines, as transformers computes them), so a
forward pass never meets a token/feature mismatch. Labels are -100 everywhere except on
assistant answers and their end-of-turn token. Over-long samples lose text from the end,
never part of an image; a sample whose image tokens alone exceed `seq_length` is dropped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from llavanext.data.templates import IMAGE, Template
from llavanext.errors import DataError

IGNORE = -100


def select_best_resolution(original_size, possible_resolutions):
    """transformers' choice of the pinpoint that keeps the most pixels and wastes the fewest."""
    original_height, original_width = original_size
    best_fit, max_effective, min_wasted = None, 0, float("inf")
    for height, width in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        down_w, down_h = int(original_width * scale), int(original_height * scale)
        effective = min(down_w * down_h, original_width * original_height)
        wasted = width * height - effective
        if effective > max_effective or (effective == max_effective and wasted < min_wasted):
            max_effective, min_wasted, best_fit = effective, wasted, (height, width)
    return best_fit


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


def make_image_processor(model_cfg: DictConfig):
    """transformers' own LLaVA-NeXT image processor for this model's tile size and pinpoints."""
    try:  # transformers >= 5 names the torchvision-free backend explicitly
        from transformers import LlavaNextImageProcessorPil as Processor
    except ImportError:
        from transformers import LlavaNextImageProcessor as Processor
    tile = model_cfg.vision.image_size
    return Processor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                     image_grid_pinpoints=[list(p) for p in model_cfg.image_grid_pinpoints], do_pad=False)


@dataclass
class Encoded:
    input_ids: torch.Tensor                    # (seq,)
    labels: torch.Tensor                       # (seq,)
    pixel_values: list[torch.Tensor] = field(default_factory=list)  # per image (tiles, 3, H, W)
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False


class TaskEncoder:
    def __init__(self, tokenizer, template: Template, model_cfg: DictConfig, seq_length: int,
                 image_token_id: int):
        self.tokenizer = tokenizer
        self.template = template
        self.model_cfg = model_cfg
        self.seq_length = seq_length
        self.image_token_id = image_token_id
        self.image_processor = make_image_processor(model_cfg)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokens(self, text: str, counts: list[int]) -> list[int]:
        """Token ids of `text` with each `<image>` replaced by its image's tokens (counts consumed)."""
        ids = []
        pieces = text.split(IMAGE)
        for i, piece in enumerate(pieces):
            if piece:
                ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"]
            if i < len(pieces) - 1:
                ids += [self.image_token_id] * counts.pop(0)
        return ids

    def encode(self, conversations, images=(), *, generation: bool = False) -> Encoded:
        """One record: its conversation (LLaVA or OpenAI turns) and its PIL images in marker order."""
        segments = self.template.render(conversations, generation=generation)
        markers = sum(s.text.count(IMAGE) for s in segments)
        if markers != len(images):
            raise DataError(f"{markers} <image> marker(s) but {len(images)} image(s)")
        counts = [image_token_count(im.height, im.width, self.model_cfg) for im in images]
        ids, labels = [], []
        if self.tokenizer.bos_token_id is not None:
            ids.append(self.tokenizer.bos_token_id)
            labels.append(IGNORE)
        for segment in segments:
            seg_ids = self.tokens(segment.text, counts)
            ids += seg_ids
            labels += seg_ids if segment.trained else [IGNORE] * len(seg_ids)
        ids, labels, truncated = self.truncate(ids, labels, generation)
        pixel_values, sizes = [], []
        for image in images:
            out = self.image_processor([image.convert("RGB")], return_tensors="pt")
            pixel_values.append(out["pixel_values"][0])
            sizes.append((image.height, image.width))
        return Encoded(torch.tensor(ids), torch.tensor(labels), pixel_values, sizes, truncated)

    def truncate(self, ids, labels, generation):
        if len(ids) <= self.seq_length:
            return ids, labels, False
        last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
        if last_image >= self.seq_length or generation:
            raise DataError(f"{len(ids)} tokens, {ids.count(self.image_token_id)} of them image tokens, "
                            f"do not fit seq_length={self.seq_length} without cutting an image")
        if all(label == IGNORE for label in labels[: self.seq_length]):
            raise DataError(f"truncating to seq_length={self.seq_length} would leave no trained token")
        return ids[: self.seq_length], labels[: self.seq_length], True


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
    images = [pv for s in samples for pv in s.pixel_values]
    if images:
        tiles = max(pv.shape[0] for pv in images)
        pixel_values = images[0].new_zeros((len(images), tiles, *images[0].shape[1:]))
        for i, pv in enumerate(images):
            pixel_values[i, : pv.shape[0]] = pv
        out["pixel_values"] = pixel_values
        out["image_sizes"] = torch.tensor([size for s in samples for size in s.image_sizes])
    return out
