"""LLaVA-NeXT image preprocessing per core: transformers' LlavaNextImageProcessorPil vs llavanext's.

`python bench/image_bench.py [--model 7b] [--repeat 5]` prints a table (ms per image, one thread)
and checks the outputs are identical for every size measured.
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

from llavanext.data.encoder import ImageProcessor, make_image_processor

SIZES = [(480, 640), (768, 1024), (336, 1008), (500, 500), (720, 1280), (1080, 1920), (224, 224)]


def best_ms(fn, repeat: int) -> float:
    fn()  # warm up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="7b")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    cfg = OmegaConf.load(resources.files("llavanext.conf") / "model" / f"{args.model}.yaml")
    theirs, ours = make_image_processor(cfg), ImageProcessor(cfg)
    table = Table(title=f"image preprocessing, model={args.model}, 1 thread, {platform.processor() or platform.machine()}"
                        f" ({os.cpu_count()} cores), best of {args.repeat}")
    for column in ("image (h x w)", "tiles", "transformers ms", "llavanext ms", "speed-up", "max |diff|"):
        table.add_column(column, justify="right")
    total_theirs = total_ours = 0.0
    for h, w in SIZES:
        image = Image.fromarray(np.random.RandomState(h * w).randint(0, 256, (h, w, 3), dtype=np.uint8))
        want = theirs([image], return_tensors="pt")["pixel_values"][0]
        got = ours(image)
        diff = float((got - want).abs().max())
        t = best_ms(lambda im=image: theirs([im], return_tensors="pt"), args.repeat)
        o = best_ms(lambda im=image: ours(im), args.repeat)
        total_theirs, total_ours = total_theirs + t, total_ours + o
        table.add_row(f"{h} x {w}", str(got.shape[0]), f"{t:.1f}", f"{o:.1f}", f"{t / o:.2f}x", f"{diff:g}")
    table.add_row("all", "", f"{total_theirs:.1f}", f"{total_ours:.1f}", f"{total_theirs / total_ours:.2f}x", "",
                  style="bold")
    Console().print(table)


if __name__ == "__main__":
    main()
