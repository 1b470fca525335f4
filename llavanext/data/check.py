"""`llavanext data check`: scan a dataset with the model's tokenizer and template before training.

Every record goes through the training encoder's text path (template, `<image>` expansion,
labels, truncation policy) with image sizes read from file headers, in parallel over cores.
The report: counts, each bad record (id, file, reason), histograms of text tokens, image
tokens, tiles and length per sample, how many samples `seq_length` truncates or drops, and
one decoded sample with masked and trained spans shown apart. Exits 1 (a DataError after the
report) when the bad fraction passes `data.max_bad_fraction`.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import statistics
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llavanext.data.encoder import IGNORE, TaskEncoder, tile_count
from llavanext.data.sources import (
    image_paths,
    llava_conversations,
    load_hf,
    raw_images,
    read_records,
    record_id,
)
from llavanext.data.templates import get_template
from llavanext.errors import ConfigError, DataError

console = Console()


@dataclass
class Row:
    id: str
    reason: str | None = None  # None: good
    text_tokens: int = 0
    image_tokens: int = 0
    tiles: int = 0
    length: int = 0
    truncated: bool = False
    too_long: bool = False


def image_size(source, name: str, decode: bool) -> tuple[int, int]:
    """(height, width) from the header only, or after a full decode with `decode`."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            if decode:
                im.load()
            return im.height, im.width
    except FileNotFoundError:
        raise DataError(f"image {name} does not exist") from None
    except Exception as e:
        raise DataError(f"image {name} cannot be read ({type(e).__name__}: {e})") from None


def measure(encoder: TaskEncoder, rid: str, conversations, sizes) -> Row:
    """One record's row: its sizes before truncation and what seq_length does to it."""
    limit, encoder.seq_length = encoder.seq_length, 1 << 30
    try:
        full = encoder.encode_text(conversations, sizes)
    finally:
        encoder.seq_length = limit
    row = Row(rid, None, full.text_tokens, full.image_tokens,
              sum(tile_count(h, w, encoder.model_cfg) for h, w in sizes), len(full.input_ids))
    if row.length > limit:
        try:
            encoder.truncate(full.input_ids, full.labels, False)
            row.truncated = True
        except DataError as e:
            row.reason, row.too_long = str(e), True
    return row


# -- per-source scanning (runs in worker processes; the encoder arrives once per worker) ----------
STATE = {}


def init_worker(encoder, kind, source, root, decode):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    STATE.update(encoder=encoder, kind=kind, source=source, root=root, decode=decode)


def record_parts(kind: str, item, index: int, root: Path, decode: bool):
    """(conversations, image sizes) of a LLaVA record or a `datasets` row; DataError when unusable."""
    if kind == "llava_json":
        return llava_conversations(item), [image_size(root / rel, str(root / rel), decode) for rel in image_paths(item)]
    conversations = item.get("messages", item.get("conversations"))
    if conversations is None:
        raise DataError("no 'messages' or 'conversations' column")
    images = item.get("images", item.get("image"))
    sizes = []
    for n, im in enumerate([] if images is None else images if isinstance(images, list) else [images]):
        if isinstance(im, dict):  # datasets.Image(decode=False)
            name = im.get("path") or f"image {n}"
            sizes.append(image_size(im["bytes"] if im.get("bytes") is not None else root / name, name, decode))
        elif isinstance(im, str):
            sizes.append(image_size(root / im, str(root / im), decode))
        else:
            raise DataError(f"image {n} is a {type(im).__name__}, not an image, bytes or a path")
    return conversations, sizes


def scan(index: int) -> Row:
    item = STATE["source"][index]
    rid = record_id(item, index)
    try:
        conversations, sizes = record_parts(STATE["kind"], item, index, STATE["root"], STATE["decode"])
        return measure(STATE["encoder"], rid, conversations, sizes)
    except DataError as e:
        return Row(rid, str(e))


def scan_all(encoder, kind, source, root, decode, count, workers) -> list[Row]:
    args = (encoder, kind, source, root, decode)
    if workers <= 1 or count < 256:
        init_worker(*args)
        return [scan(i) for i in range(count)]
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(workers, initializer=init_worker, initargs=args) as pool:
        return pool.map(scan, range(count), chunksize=max(16, count // (workers * 8)))


# -- the report ------------------------------------------------------------------------------------
def histogram(title: str, values: list[int], bins: int = 8) -> Table:
    table = Table(title=f"{title}  (min {min(values)}, median {statistics.median(values):g}, max {max(values)})",
                  title_justify="left", show_header=False, box=None)
    low, high = min(values), max(values)
    width = max(1, -(-(high - low + 1) // bins))
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, (v - low) // width)] += 1
    top = max(counts)
    for b, n in enumerate(counts):
        if n or b == 0:
            start = low + b * width
            table.add_row(f"{start:>7}-{start + width - 1:<7}", "█" * max(1 if n else 0, round(30 * n / top)), str(n))
    return table


def decoded_sample(encoder: TaskEncoder, conversations, sizes) -> Text:
    """The sample as the model sees it: masked spans dim, trained spans green, images collapsed."""
    enc = encoder.encode_text(conversations, sizes)
    text = Text()
    run, trained, images = [], None, 0
    pieces = []
    for token, label in zip(enc.input_ids, enc.labels):
        if token == encoder.image_token_id:
            images += 1
            continue
        if images:
            pieces.append((f"<image x{images}>", False))
            images = 0
        pieces.append((token, label != IGNORE))
    if images:
        pieces.append((f"<image x{images}>", False))
    for piece, is_trained in pieces + [(None, None)]:
        if (is_trained != trained or isinstance(piece, str) or piece is None) and run:
            text.append(encoder.tokenizer.decode(run), style="bold green" if trained else "dim")
            run = []
        if isinstance(piece, str):
            text.append(piece, style="magenta")
        elif piece is not None:
            run.append(piece)
        trained = is_trained
    return text


def report(rows: list[Row], where: str, cfg: DictConfig, encoder: TaskEncoder, example) -> None:
    bad = [r for r in rows if r.reason]
    good = [r for r in rows if not r.reason]
    summary = Table(title=f"data check: {where}", title_justify="left")
    for column in ("records", "good", "bad", "truncated", "too long (dropped)", "bad fraction", "limit"):
        summary.add_column(column, justify="right")
    fraction = len(bad) / max(1, len(rows))
    summary.add_row(str(len(rows)), str(len(good)), str(len(bad)), str(sum(r.truncated for r in good)),
                    str(sum(r.too_long for r in bad)), f"{fraction:.2%}", f"{cfg.data.max_bad_fraction:.2%}",
                    style="red" if fraction > cfg.data.max_bad_fraction else None)
    console.print(summary)
    console.print(f"model={cfg.model.name} template={cfg.template} seq_length={cfg.data.seq_length}: a longer "
                  "sample loses text from its end; one whose images do not fit is dropped as bad", highlight=False)
    if bad:
        table = Table(title=f"bad records ({len(bad)})", title_justify="left")
        table.add_column("id")
        table.add_column("reason")
        for r in bad[: cfg.show]:
            table.add_row(r.id, r.reason)
        if len(bad) > cfg.show:
            table.add_row("...", f"{len(bad) - cfg.show} more (show=N lists more)")
        console.print(table)
    if good:
        for title, values in (("text tokens per sample", [r.text_tokens for r in good]),
                              ("image tokens per sample", [r.image_tokens for r in good]),
                              ("tiles per sample", [r.tiles for r in good]),
                              ("tokens per sample (before truncation)", [r.length for r in good])):
            console.print(histogram(title, values))
    if example is not None:
        console.print(f"[bold]one sample[/] (id {example[0]}): [dim]masked[/] [bold green]trained[/] "
                      "[magenta]image tokens[/]")
        console.print(decoded_sample(encoder, *example[1:]))


def run(cfg: DictConfig) -> list[Row]:
    from llavanext.assemble import load_tokenizer

    data = cfg.data
    tokenizer = load_tokenizer(cfg.model)
    if tokenizer is None:
        raise ConfigError("data check needs the model's tokenizer: set model.tokenizer (a folder, or demo)")
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise ConfigError("the tokenizer has no <image> token")
    encoder = TaskEncoder(tokenizer, get_template(cfg.template), cfg.model, data.seq_length, image_token_id)
    if data.source in ("llava_json", "demo"):
        if data.source == "demo":
            from llavanext.demo.shapes import ensure_dataset

            root = ensure_dataset(data.num_train, data.num_val, data.seed)
            path = root / ("captions.json" if data.split == "pretrain" else "train.json")
        else:
            path, root = Path(data.path), Path(data.image_root or Path(data.path).parent)
        source, kind, where = read_records(path), "llava_json", str(path)
    elif data.source == "hf":
        if data.get("streaming"):
            raise ConfigError("data check reads a `datasets` dataset whole: set data.streaming=false")
        source, kind, where = raw_images(load_hf(data.path, split=data.get("split", "train"))), "hf", str(data.path)
        root = Path(data.get("image_root") or (data.path if Path(data.path).is_dir() else Path(data.path).parent))
    else:
        raise ConfigError(f"data check reads llava_json, demo and hf data, not data.source={data.source} "
                          "(check the LLaVA JSON before `data prepare`)")
    count = len(source) if cfg.limit is None else min(cfg.limit, len(source))
    workers = cfg.workers or os.cpu_count() or 1
    rows = scan_all(encoder, kind, source, root, bool(cfg.decode_images), count, workers)
    first = next((i for i, r in enumerate(rows) if not r.reason), None)
    example = None if first is None else (rows[first].id, *record_parts(kind, source[first], first, root, False))
    report(rows, where, cfg, encoder, example)
    bad = sum(1 for r in rows if r.reason)
    if rows and bad > data.max_bad_fraction * len(rows):
        raise DataError(f"{bad} of {len(rows)} records are bad ({bad / len(rows):.1%}), more than "
                        f"data.max_bad_fraction={data.max_bad_fraction}")
    return rows
