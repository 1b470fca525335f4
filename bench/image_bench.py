"""LLaVA-NeXT image preprocessing per core: transformers' LlavaNextImageProcessorPil vs llavanext's.

`python bench/image_bench.py [--model 7b] [--repeat 5]` prints a table (ms per image, one thread) for
both of our resizers (`model.image_resize`), and each one's largest pixel difference from transformers
in 1/255 steps (before normalisation). Images are uniform noise, the worst case for the difference.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from importlib import resources

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image
from rich.console import Console
from rich.table import Table

from llavanext.data.images import CLIP_STD, ImageProcessor, make_image_processor

SIZES = [(480, 640), (768, 1024), (336, 1008), (500, 500), (720, 1280), (1080, 1920), (224, 224)]


def best_ms(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def byte_steps(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """|ours - theirs| in 1/255 steps of the uint8 pixels both were normalised from."""
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((ours - theirs) * std * 255).abs().round()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="7b")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = OmegaConf.load(resources.files("llavanext.conf") / "model" / f"{args.model}.yaml")
    theirs = make_image_processor(cfg)
    ours = {name: ImageProcessor(OmegaConf.merge(cfg, {"image_resize": name})) for name in ("pil", "torch")}
    table = Table(title=f"image preprocessing, model={args.model}, 1 thread, {platform.processor() or platform.machine()}"
                        f" ({os.cpu_count()} cores), best of {args.repeat}; diff: max |ours - theirs| in 1/255")
    for column in ("image (h x w)", "tiles", "transformers ms", "pil ms", "speed-up", "diff",
                   "torch ms", "speed-up", "diff"):
        table.add_column(column, justify="right")
    totals = {"transformers": 0.0, "pil": 0.0, "torch": 0.0}
    for h, w in SIZES:
        image = Image.fromarray(np.random.RandomState(h * w).randint(0, 256, (h, w, 3), dtype=np.uint8))
        want = theirs([image], return_tensors="pt")["pixel_values"][0]
        t = best_ms(lambda im=image: theirs([im], return_tensors="pt"), args.repeat)
        totals["transformers"] += t
        row = [f"{h} x {w}", str(want.shape[0]), f"{t:.1f}"]
        for name, processor in ours.items():
            steps = float(byte_steps(processor(image), want).max())
            ms = best_ms(lambda im=image, p=processor: p(im), args.repeat)
            totals[name] += ms
            row += [f"{ms:.1f}", f"{t / ms:.2f}x", f"{steps:g}"]
        table.add_row(*row)
    t = totals["transformers"]
    table.add_row("all", "", f"{t:.1f}", f"{totals['pil']:.1f}", f"{t / totals['pil']:.2f}x", "",
                  f"{totals['torch']:.1f}", f"{t / totals['torch']:.2f}x", "", style="bold")
    Console(width=140).print(table)


if __name__ == "__main__":
    main()
