"""LLaVA-NeXT image preprocessing: one PIL image to (tiles, 3, tile, tile) pixel values.

The steps are transformers' `LlavaNextImageProcessor`: resize (bicubic, aspect kept) into the
best pinpoint, pad centred with black, cut into tiles, prepend the whole image squashed to one
tile, rescale by 1/255 and normalise with CLIP's mean/std. `model.image_resize` picks who resizes:

- `torch` (default): torch's antialiased bicubic on uint8, the kernel transformers' torchvision
  backend calls, with its two passes run in the order Pillow runs them. Stated tolerance: every
  pixel within 2/255 of `LlavaNextImageProcessorPil` before normalisation (99% of them equal;
  tested on noise, the worst case). About 5.7x transformers' speed per core (bench/image_bench.py).
- `pil`: the same Pillow calls as `LlavaNextImageProcessorPil`: bit-identical output.

Why the pass order matters: both libraries resize one axis, round to uint8, then the other.
Rounding and clipping between the passes make the two orders differ by up to 27/255 on noise;
in the same order torch and Pillow agree within 1/255 a pass.
"""

from __future__ import annotations

import functools
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

# transformers' CLIP normalisation (OPENAI_CLIP_MEAN / OPENAI_CLIP_STD)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESIZERS = ("torch", "pil")


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


def make_image_processor(model_cfg: DictConfig):
    """transformers' own LLaVA-NeXT image processor for this model's tile size and pinpoints (the reference)."""
    try:  # transformers >= 5 names the torchvision-free backend explicitly
        from transformers import LlavaNextImageProcessorPil as Processor
    except ImportError:
        from transformers import LlavaNextImageProcessor as Processor
    tile = model_cfg.vision.image_size
    return Processor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                     image_grid_pinpoints=[list(p) for p in model_cfg.image_grid_pinpoints], do_pad=False)


# -- Pillow's pass order -----------------------------------------------------------------------

def _pillow_would_shrink_height_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Pillow >= 13's rule (measured: it predicts Pillow on every size pair tested, see the tests):
    the vertical pass goes first when the image does not grow on both axes and the height loses
    more than twice as many pixels as the width."""
    if new_width >= width and new_height >= height:
        return False
    return height - new_height > 2 * (width - new_width)


@functools.cache
def pillow_orders_passes() -> bool:
    """Whether this Pillow picks the pass order by shape (13 does); older ones always go horizontal first.

    Probed once on a noise image whose two orders give different pixels.
    """
    from PIL import Image

    bicubic = Image.Resampling.BICUBIC
    image = Image.fromarray(np.random.RandomState(0).randint(0, 256, (40, 12, 3), dtype=np.uint8))
    whole = np.asarray(image.resize((10, 20), bicubic))
    height_first = np.asarray(image.resize((12, 20), bicubic).resize((10, 20), bicubic))
    return np.array_equal(whole, height_first)


def height_first(width: int, height: int, new_width: int, new_height: int) -> bool:
    """Whether Pillow resizes this size pair vertical pass first."""
    return pillow_orders_passes() and _pillow_would_shrink_height_first(width, height, new_width, new_height)


def resize(pixels: torch.Tensor, new_height: int, new_width: int) -> torch.Tensor:
    """Bicubic antialiased resize of (1, C, H, W) uint8, passes in Pillow's order (within 2/255 of Pillow)."""
    height, width = pixels.shape[-2:]
    kwargs = dict(mode="bicubic", antialias=True, align_corners=False)
    if new_height != height and new_width != width and height_first(width, height, new_width, new_height):
        pixels = F.interpolate(pixels, size=(new_height, width), **kwargs)
    # torch's own two-pass order is horizontal first, and it skips a pass whose size is unchanged
    return F.interpolate(pixels, size=(new_height, new_width), **kwargs)


def as_tensor(image) -> torch.Tensor:
    """An RGB PIL image as (1, 3, H, W) uint8, channels last (the layout torch's uint8 resize is fast on)."""
    with warnings.catch_warnings():  # read-only view of PIL's bytes: nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.asarray(image)).permute(2, 0, 1).unsqueeze(0)


# -- the processor -------------------------------------------------------------------------------

class ImageProcessor:
    """transformers' LLaVA-NeXT preprocessing without its detours (numpy<->PIL round trips, a no-op
    resize and crop of every tile, float64 passes).

    The float steps give transformers' float32 values exactly: x/255 in float32 equals its float64
    rescale rounded to float32 for all 256 byte values (checked below), and the normalise is the
    same float32 subtract and divide. So `pil` is identical, and `torch` differs only by its resize.
    """

    def __init__(self, model_cfg: DictConfig):
        # run folders written before model.image_resize existed resized with Pillow
        self.resizer = model_cfg.get("image_resize", "pil")
        if self.resizer not in RESIZERS:
            from llavanext.errors import ConfigError

            raise ConfigError(f"model.image_resize={self.resizer!r}; choose from {', '.join(RESIZERS)}")
        self.tile = model_cfg.vision.image_size
        self.pinpoints = [tuple(p) for p in model_cfg.image_grid_pinpoints]
        self.mean = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
        reference = (np.arange(256).astype(np.float64) * (1 / 255)).astype(np.float32)  # transformers' rescale
        assert np.array_equal(reference, (torch.arange(256, dtype=torch.float32) / 255).numpy())

    def layout(self, height: int, width: int):
        """(best_h, best_w) pinpoint, (new_h, new_w) of the resized image and its (top, left) in the pinpoint."""
        best_h, best_w = select_best_resolution((height, width), self.pinpoints)
        scale_w, scale_h = best_w / width, best_h / height
        if scale_w < scale_h:
            new_w, new_h = best_w, min(math.ceil(height * scale_w), best_h)
        else:
            new_w, new_h = min(math.ceil(width * scale_h), best_w), best_h
        return (best_h, best_w), (new_h, new_w), ((best_h - new_h) // 2, (best_w - new_w) // 2)

    def __call__(self, image) -> torch.Tensor:
        """(tiles, 3, tile, tile) float32 for one PIL image."""
        image = image.convert("RGB")
        (best_h, best_w), (new_h, new_w), (top, left) = self.layout(image.height, image.width)
        base, resized = (self._resize_torch if self.resizer == "torch" else self._resize_pil)(image, new_h, new_w)
        tile, rows, cols = self.tile, best_h // self.tile, best_w // self.tile
        canvas = torch.zeros(3, best_h, best_w, dtype=torch.uint8)  # the black padding
        canvas[:, top:top + new_h, left:left + new_w] = resized
        out = torch.empty(1 + rows * cols, 3, tile, tile)
        out[0].copy_(base)
        # tiles in row-major order, each (3, tile, tile); the uint8 -> float cast happens in this copy
        out[1:].view(rows, cols, 3, tile, tile).copy_(canvas.view(3, rows, tile, cols, tile).permute(1, 3, 0, 2, 4))
        return out.div_(255).sub_(self.mean).div_(self.std)

    def _resize_torch(self, image, new_h: int, new_w: int):
        pixels = as_tensor(image)
        return resize(pixels, self.tile, self.tile)[0], resize(pixels, new_h, new_w)[0]

    def _resize_pil(self, image, new_h: int, new_w: int):
        from PIL import Image

        bicubic = Image.Resampling.BICUBIC
        return (as_tensor(image.resize((self.tile, self.tile), bicubic))[0],
                as_tensor(image.resize((new_w, new_h), bicubic))[0])
