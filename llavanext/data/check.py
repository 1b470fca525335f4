"""`llavanext data check`: scan a dataset with the model's tokenizer and template before training.

Every record goes through the training encoder's text path (template, `<image>` expansion,
labels, truncation policy) with image sizes read from file headers, in parallel over cores.
The report: counts, each bad record (id, where, reason), histograms of text tokens, image
tokens, tiles and length per sample, how many samples `seq_length` truncates or drops, and
one decoded sample with masked and trained spans shown apart. Exits 1 (a DataError after the
report) when the bad fraction passes `data.max_bad_fraction`.

It reads llava_json, demo and hf records; energon's prepared folders shard by shard (the train
split's WebDataset tars, read with `tarfile`: no energon loader); each source of a mix in turn,
one report each (failing when any one is over its limit); mock data has nothing to check.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import re
import statistics
import tarfile
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path

from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from llavanext.data.encoder import IGNORE, TaskEncoder, tile_count
from llavanext.data.sources import (
    BAD,
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
    where: str = ""  # energon: `shard/key` (energon's own name for a sample)


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


# -- energon: a prepared folder's shards, read directly --------------------------------------------
MEMBER = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's rule: the key ends at the name's first dot


def train_shards(path: Path) -> list[str]:
    """The train split's shards of a prepared energon dataset, relative to it, as .nv-meta/split.yaml lists them."""
    if not path.exists():
        raise DataError(f"data.path={path} does not exist")
    split = path / ".nv-meta" / "split.yaml"
    if not split.is_file():
        raise ConfigError(f"data check reads a prepared energon folder (with .nv-meta/split.yaml, as `llavanext data "
                          f"prepare` writes it), and data.path={path} is not one (a metadataset YAML: check each "
                          "dataset it names)")
    try:
        import braceexpand  # energon's dependency: its split.yaml names shards with {000000..000009}
        import yaml
    except ImportError:
        raise ConfigError("data=energon needs megatron-energon: pip install 'llavanext[energon]'") from None
    config = yaml.safe_load(split.read_text()) or {}
    exclude = {name for pattern in config.get("exclude") or [] for name in braceexpand.braceexpand(pattern)}
    names = [name for pattern in (config.get("split_parts") or {}).get("train") or []
             for name in braceexpand.braceexpand(pattern) if name not in exclude]
    if not names:
        raise DataError(f"{split} lists no train shards")
    return names


def shard_samples(path: Path):
    """(key, {suffix: bytes}) of each sample of a WebDataset tar: consecutive members grouped by key."""
    key, members = None, {}
    with tarfile.open(path, "r|*") as tar:
        for info in tar:
            match = MEMBER.match(info.name) if info.isfile() else None
            if match is None:
                continue
            if match[1] != key and members:
                yield key, members
                members = {}
            key = match[1]
            members[match[2]] = tar.extractfile(info).read()
    if members:
        yield key, members


def shard_items(root: Path, name: str):
    """(id, (record, members), `shard/key`) of each sample of one shard of a prepared dataset."""
    for key, members in shard_samples(root / name):
        if "json" not in members:
            record = {"id": key, BAD: "no .json member"}
        else:
            try:  # a byte that is not UTF-8 is kept, as read_records does: that record is reported bad
                record = json.loads(members["json"].decode("utf-8", errors="surrogateescape"))
            except ValueError as e:
                record = {"id": key, BAD: f"unreadable .json ({e})"}
        yield record_id(record, key), (record, members), f"{name}/{key}"


# -- per-source scanning (runs in worker processes; the encoder arrives once per worker) ----------
STATE = {}


def init_worker(encoder, kind, source, root, decode):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    STATE.update(encoder=encoder, kind=kind, source=source, root=root, decode=decode)


def record_parts(kind: str, item, root: Path, decode: bool):
    """(conversations, image sizes) of a LLaVA record, a `datasets` row or an energon sample; DataError when unusable."""
    if kind == "llava_json":
        return llava_conversations(item), [image_size(root / rel, str(root / rel), decode) for rel in image_paths(item)]
    if kind == "energon":
        record, members = item
        conversations = llava_conversations(record)
        sizes = []
        for name in record.get("images") or []:
            if name not in members:
                raise DataError(f"image {name} is missing from the shard")
            sizes.append(image_size(members[name], name, decode))
        return conversations, sizes
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


def row_of(rid: str, item, where: str = "") -> Row:
    try:
        row = measure(STATE["encoder"], rid, *record_parts(STATE["kind"], item, STATE["root"], STATE["decode"]))
    except DataError as e:
        row = Row(rid, str(e))
    row.where = where
    return row


def scan(index: int) -> list[Row]:
    """The rows of one unit of work: a record, or a whole shard of an energon dataset."""
    source = STATE["source"]
    if STATE["kind"] != "energon":
        return [row_of(record_id(source[index], index), source[index])]
    rows = []
    try:
        for rid, item, where in shard_items(STATE["root"], source[index]):
            rows.append(row_of(rid, item, where))
    except (OSError, tarfile.TarError) as e:  # a missing or damaged tar: its readable samples are counted
        rows.append(Row(source[index], f"shard cannot be read ({type(e).__name__}: {e})", where=source[index]))
    return rows


def scan_all(encoder, kind, source, root, decode, limit, workers) -> list[Row]:
    """Rows of the first `limit` records (None: all), records or (energon) shards spread over `workers`."""
    args = (encoder, kind, source, root, decode)
    units = len(source) if kind == "energon" or limit is None else min(limit, len(source))
    if workers <= 1 or units < (2 if kind == "energon" else 256):
        init_worker(*args)
        return list(islice(chain.from_iterable(map(scan, range(units))), limit))
    chunksize = 1 if kind == "energon" else max(16, units // (workers * 8))
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    with context.Pool(min(workers, units), initializer=init_worker, initargs=args) as pool:
        return list(islice(chain.from_iterable(pool.imap(scan, range(units), chunksize)), limit))


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


def report(rows: list[Row], where: str, cfg: DictConfig, limit: float, encoder: TaskEncoder, example) -> None:
    bad = [r for r in rows if r.reason]
    good = [r for r in rows if not r.reason]
    console.print(f"[bold]data check: {where}", highlight=False)  # a line of its own: a table title wraps a path
    summary = Table()
    for column in ("records", "good", "bad", "truncated", "too long (dropped)", "bad fraction", "limit"):
        summary.add_column(column, justify="right")
    fraction = len(bad) / max(1, len(rows))
    summary.add_row(str(len(rows)), str(len(good)), str(len(bad)), str(sum(r.truncated for r in good)),
                    str(sum(r.too_long for r in bad)), f"{fraction:.2%}", f"{limit:.2%}",
                    style="red" if fraction > limit else None)
    console.print(summary)
    console.print(f"model={cfg.model.name} template={cfg.template} seq_length={encoder.seq_length}: a longer "
                  "sample loses text from its end; one whose images do not fit is dropped as bad", highlight=False)
    if bad:
        table = Table(title=f"bad records ({len(bad)})", title_justify="left")
        table.add_column("id")
        located = any(r.where for r in bad)
        if located:
            table.add_column("where")
        table.add_column("reason")
        for r in bad[: cfg.show]:
            table.add_row(r.id, *([r.where] if located else []), r.reason)
        if len(bad) > cfg.show:
            table.add_row("...", *([""] if located else []), f"{len(bad) - cfg.show} more (show=N lists more)")
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


# -- the command -----------------------------------------------------------------------------------
def open_source(data: DictConfig) -> tuple[str, object, Path, str]:
    """(kind, records or shard names, root, name) of one source's config."""
    if data.source in ("llava_json", "demo"):
        if data.source == "demo":
            from llavanext.demo.shapes import ensure_dataset

            root = ensure_dataset(data.num_train, data.num_val, data.seed)
            path = root / ("captions.json" if data.split == "pretrain" else "train.json")
        else:
            path, root = Path(data.path), Path(data.get("image_root") or Path(data.path).parent)
        return "llava_json", read_records(path), root, str(path)
    if data.source == "hf":
        if data.get("streaming"):
            raise ConfigError("data check reads a `datasets` dataset whole: set data.streaming=false")
        root = Path(data.get("image_root") or (data.path if Path(data.path).is_dir() else Path(data.path).parent))
        return "hf", raw_images(load_hf(data.path, split=data.get("split", "train"))), root, str(data.path)
    if data.source == "energon":
        return "energon", train_shards(Path(data.path)), Path(data.path), f"{data.path} (train split)"
    raise ConfigError(f"data check reads llava_json, demo, hf, energon, mix and mock data, not "
                      f"data.source={data.source}")


def check_source(cfg: DictConfig, data: DictConfig, encoder: TaskEncoder, name: str = "") -> list[Row]:
    """Scan one source and print its report; `name` tells a mix's sources apart."""
    kind, source, root, where = open_source(data)
    workers = cfg.workers or os.cpu_count() or 1
    rows = scan_all(encoder, kind, source, root, bool(cfg.decode_images), cfg.limit, workers)
    first = next((i for i, r in enumerate(rows) if not r.reason), None)
    example = None
    if first is not None:
        if kind == "energon":  # its shard is read again, up to that sample
            item = next(item for shard in source for _, item, at in shard_items(root, shard) if at == rows[first].where)
        else:
            item = source[first]
        example = (rows[first].id, *record_parts(kind, item, root, False))
    report(rows, f"{name}: {where}" if name else where, cfg, data.max_bad_fraction, encoder, example)
    return rows


def run(cfg: DictConfig) -> list[Row]:
    """Check `cfg.data`, each source of a mix in turn; a DataError after the reports when any is over its limit."""
    from llavanext.assemble import load_tokenizer

    sources = [("", cfg.data)]
    if cfg.data.source == "mix":
        from llavanext.data.datamodule import merged  # each entry as training reads it

        sources = [(f"data.sources[{n}]", merged(cfg.data, entry)) for n, entry in enumerate(cfg.data.sources)]
    encoder, everything, failures = None, [], []
    for name, data in sources:
        if data.source == "mock":  # not a ConfigError: a mix with a mock part still checks its other parts
            console.print(f"{name + ': ' if name else ''}data=mock is synthetic (tokens and images made on the fly): "
                          "nothing to check", highlight=False)
            continue
        if encoder is None:
            tokenizer = load_tokenizer(cfg.model)
            if tokenizer is None:
                raise ConfigError("data check needs the model's tokenizer: set model.tokenizer (a folder, or demo)")
            image_token_id = tokenizer.convert_tokens_to_ids("<image>")
            if image_token_id is None or image_token_id == tokenizer.unk_token_id:
                raise ConfigError("the tokenizer has no <image> token")
            encoder = TaskEncoder(tokenizer, get_template(cfg.template), cfg.model, cfg.data.seq_length,
                                  image_token_id)
        rows = check_source(cfg, data, encoder, name)
        bad = sum(1 for r in rows if r.reason)
        if rows and bad > data.max_bad_fraction * len(rows):
            failures.append(f"{name + ': ' if name else ''}{bad} of {len(rows)} records are bad "
                            f"({bad / len(rows):.1%}), more than data.max_bad_fraction={data.max_bad_fraction}")
        everything += rows
    if failures:
        raise DataError("; ".join(failures))
    return everything
