"""The generate task: answers to prompts about images, from a run, a store model or a HF folder.

    llavanext generate checkpoint=outputs/finetune/<run> image=cat.png prompt="What is it?"
    llavanext generate checkpoint=<hf folder> images=[a.png,b.png] prompt="Compare them"
    llavanext generate checkpoint=<...> input=questions.jsonl output=answers.jsonl batch_size=16

Config in, answers out: a single prompt streams to the terminal; a JSONL file is answered in
batches and each answer (or the reason a record could not be answered) is appended to the
output as soon as it is known, so a crash keeps what was written and a rerun skips the ids
already answered. The chat template and image processing always come from the checkpoint: a
run's `template` and model config, or a HF folder's processor and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig

from llavanext.data.encoder import Encoded, TaskEncoder, collate
from llavanext.data.templates import IMAGE, get_template
from llavanext.decoding import Decoder, Sampling
from llavanext.errors import CheckpointError, ConfigError, DataError

SAMPLING_KEYS = tuple(f.name for f in dataclasses.fields(Sampling))
RECORD_KEYS = ("id", "prompt", "image", "images", "stop", *SAMPLING_KEYS)


@dataclass
class Request:
    """One prompt: its images (paths or PIL images), settings, and where it came from."""

    prompt: str
    images: list = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    stop: tuple[str, ...] = ()
    id: object = None
    line: int | None = None  # its line in the input JSONL

    @property
    def name(self) -> str:
        if self.line is not None:
            return f"record {self.id!r} (line {self.line})"
        return "the prompt"


@dataclass
class Prepared:
    request: Request
    encoded: Encoded
    limit: int  # max_new_tokens, cut to what the context leaves


@dataclass
class Answer:
    text: str
    tokens: int
    finish: str  # eos, stop or length


# ---------------------------------------------------------------------------------------------
# Prompts: text + images -> token ids (image tokens expanded) and pixel values, as the checkpoint says


def load_image(source, where: str):
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, Image.Image):
        return source.convert("RGB")
    try:
        with Image.open(source) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{where}: image {source} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"{where}: image {source} cannot be read ({e})") from None


def with_markers(prompt: str, images: int) -> str:
    """The prompt with one `<image>` per image: as the user placed them, or all up front (LLaVA's habit)."""
    markers = prompt.count(IMAGE)
    if markers == 0:
        return f"{IMAGE}\n" * images + prompt
    if markers != images:
        raise DataError(f"{markers} {IMAGE} marker(s) in the prompt but {images} image(s) given")
    return prompt


class RunPrompts:
    """A run's chat template (`cfg.template`) and task encoder: the prompts it was trained on."""

    def __init__(self, cfg: DictConfig, tokenizer, image_token_id: int, system: str | None):
        self.template = get_template(cfg.template)
        # no length limit here: Generator.prepare checks the prompt against the model's context
        self.encoder = TaskEncoder(tokenizer, self.template, cfg.model, 10**9, image_token_id)
        self.system = system

    def encode(self, prompt: str, images: list) -> Encoded:
        turns = [{"from": "system", "value": self.system}] if self.system else []
        turns.append({"from": "human", "value": with_markers(prompt, len(images))})
        return self.encoder.encode(turns, images, generation=True)


class FolderPrompts:
    """A HF folder's processor: its chat template (processor's, else tokenizer's) and image processor."""

    def __init__(self, processor, system: str | None):
        self.processor = processor
        self.system = system

    def encode(self, prompt: str, images: list) -> Encoded:
        text = with_markers(prompt, len(images))
        processor = self.processor
        if getattr(processor, "chat_template", None):
            content = []
            for i, piece in enumerate(text.split(IMAGE)):
                if i:
                    content.append({"type": "image"})
                if piece:
                    content.append({"type": "text", "text": piece})
            messages = [{"role": "user", "content": content}]
            if self.system:
                messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system}]})
            chat = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        else:
            messages = [{"role": "user", "content": text}]
            if self.system:
                messages.insert(0, {"role": "system", "content": self.system})
            chat = processor.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out = processor(images=images or None, text=chat, return_tensors="pt")
        ids = out["input_ids"][0]
        pixel_values = list(out["pixel_values"]) if images else []
        sizes = [tuple(s) for s in out["image_sizes"].tolist()] if images else []
        return Encoded(ids, ids.clone(), pixel_values, sizes)


# ---------------------------------------------------------------------------------------------
# Checkpoints: where a name points, and the model + prompts it holds


def locate(checkpoint: str) -> Path:
    """A file or folder as given, else a store name or `hf://` reference through the store."""
    from llavanext import store

    path = Path(checkpoint).expanduser()
    return path if path.exists() else store.resolve(checkpoint)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device={device!r} is not a device (auto, cpu, cuda, cuda:1, ...)") from None


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    from llavanext.model import DTYPES

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r}; choose from auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_run(path: Path, system: str | None):
    from llavanext.assemble import from_run

    cfg, built = from_run(path)
    if built.tokenizer is None:
        raise CheckpointError(f"{path}: its model has no tokenizer (model.tokenizer is null), so it cannot read "
                              "prompts")
    model = built.model
    if hasattr(model, "merge_and_unload"):  # LoRA: fold the adapters in, decoding is then plain matmuls
        model = model.merge_and_unload()
    prompts = RunPrompts(cfg, built.tokenizer, built.image_token_id, system)
    eos = built.tokenizer.convert_tokens_to_ids(prompts.template.eos)
    return model, built.tokenizer, prompts, [eos] if isinstance(eos, int) else []


def load_folder(path: Path, dtype: torch.dtype, system: str | None):
    from transformers import AutoConfig, AutoProcessor, LlavaNextForConditionalGeneration

    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is neither a run folder (config.yaml) nor a HF folder (config.json)")
    config = AutoConfig.from_pretrained(path)
    if config.model_type != "llava_next":
        raise CheckpointError(f"{path} holds a {config.model_type!r} model, not llava_next")
    try:
        processor = AutoProcessor.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} has no usable processor (tokenizer + image processor): {e}") from None
    if not (getattr(processor, "chat_template", None) or getattr(processor.tokenizer, "chat_template", None)):
        raise CheckpointError(f"{path} has no chat template (chat_template.jinja / tokenizer_config.json)")
    model = LlavaNextForConditionalGeneration.from_pretrained(path, dtype=dtype)
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return model, processor.tokenizer, FolderPrompts(processor, system), eos


class Generator:
    """A loaded checkpoint that answers requests: prompts in, text out (streamed if asked)."""

    def __init__(self, model, tokenizer, prompts, eos_ids, decode: str = "eager"):
        self.model = model
        self.tokenizer = tokenizer
        self.prompts = prompts
        self.eos_ids = {i for i in [*eos_ids, tokenizer.eos_token_id] if i is not None}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.context = model.config.text_config.max_position_embeddings
        self.decoder = Decoder(model, decode)

    def prepare(self, request: Request) -> Prepared:
        """Images read, prompt encoded and checked against the context; DataError names the request."""
        try:
            images = [load_image(source, request.name) for source in request.images]
            encoded = self.prompts.encode(request.prompt, images)
        except DataError as e:
            raise DataError(str(e) if str(e).startswith(f"{request.name}:") else f"{request.name}: {e}") from None
        length = len(encoded.input_ids)
        if length >= self.context:
            image_tokens = int((encoded.input_ids == self.model.config.image_token_index).sum())
            raise DataError(f"{request.name}: the prompt is {length} tokens ({image_tokens} of them image tokens) "
                            f"but the model's context is {self.context}")
        return Prepared(request, encoded, min(request.sampling.max_new_tokens, self.context - length))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def batch(self, prepared: list[Prepared]) -> dict:
        """Left-padded: every row's last prompt token sits in the last column, where decoding continues."""
        out = collate([p.encoded for p in prepared], self.pad_id)
        out.pop("labels")
        width = out["input_ids"].shape[1]
        for i, n in enumerate(out["attention_mask"].sum(1).tolist()):
            out["input_ids"][i] = out["input_ids"][i].roll(width - n)
            out["attention_mask"][i] = out["attention_mask"][i].roll(width - n)
        return out

    def answer(self, prepared: list[Prepared], on_text=None) -> list[Answer]:
        """Answers for requests that share sampling settings (max_new_tokens and stop may differ);
        `on_text(piece)` receives the first answer as it grows."""
        sampling = dataclasses.replace(prepared[0].request.sampling, max_new_tokens=max(p.limit for p in prepared))
        ids = [[] for _ in prepared]
        finish = [None] * len(prepared)
        shown = 0
        for tokens in self.decoder.stream(self.batch(prepared), sampling):
            for i, (p, token) in enumerate(zip(prepared, tokens)):
                if finish[i]:
                    continue
                if token in self.eos_ids:
                    finish[i] = "eos"
                    continue
                ids[i].append(token)
                if p.request.stop and any(s in self.decode(ids[i]) for s in p.request.stop):
                    finish[i] = "stop"
                elif len(ids[i]) >= p.limit:
                    finish[i] = "length"
            if on_text:
                shown = self.show(ids[0], prepared[0].request.stop, finish[0] is not None, shown, on_text)
            if all(finish):
                break
        return [Answer(cut(self.decode(x), p.request.stop).strip(), len(x), f)
                for x, p, f in zip(ids, prepared, finish)]

    def show(self, ids, stop, done, shown, on_text) -> int:
        """Send what is new of the text, holding back a half-decoded character or a possible stop string."""
        text = cut(self.decode(ids), stop).lstrip()
        if not done:
            text = text.rstrip("\ufffd")
            held = max((n for s in stop for n in range(len(s), 0, -1) if text.endswith(s[:n])), default=0)
            text = text[: len(text) - held]
        if len(text) > shown:
            on_text(text[shown:])
        return max(shown, len(text))


def cut(text: str, stop) -> str:
    """The text before the first stop string."""
    for s in stop:
        if s in text:
            text = text[: text.index(s)]
    return text


def load(checkpoint: str, *, device: str = "auto", dtype: str = "auto", decode: str = "auto",
         system: str | None = None) -> Generator:
    """A Generator from a store name, a HF folder, a run folder or a .ckpt file."""
    path = locate(checkpoint)
    if path.is_file() and path.suffix != ".ckpt":
        raise CheckpointError(f"checkpoint={checkpoint} is a file but not a .ckpt")
    device_ = pick_device(device)
    dtype_ = pick_dtype(dtype, device_)
    if path.is_file() or (path / "config.yaml").is_file():
        model, tokenizer, prompts, eos = load_run(path, system)
    else:
        model, tokenizer, prompts, eos = load_folder(path, dtype_, system)
    model = model.to(device=device_, dtype=dtype_).eval()
    if decode == "auto":
        decode = "graph" if device_.type == "cuda" else "eager"
    return Generator(model, tokenizer, prompts, eos, decode)


# ---------------------------------------------------------------------------------------------
# The task


def sampling_of(cfg: DictConfig) -> Sampling:
    sampling = Sampling(**{k: cfg[k] for k in SAMPLING_KEYS})
    sampling.check()
    return sampling


def stops(value, where: str) -> tuple[str, ...]:
    value = [value] if isinstance(value, str) else value
    if not isinstance(value, Sequence) or not all(isinstance(s, str) and s for s in value):
        raise DataError(f"{where}: stop must be a string or a list of non-empty strings")
    return tuple(value)


def single_request(cfg: DictConfig, sampling: Sampling) -> Request:
    if cfg.prompt is None:
        raise ConfigError("nothing to answer: give prompt=... (with image=... or images=[...]) or input=<file>.jsonl")
    if cfg.image is not None and cfg.images:
        raise ConfigError("give image=... for one image or images=[...] for several, not both")
    paths = [cfg.image] if cfg.image is not None else list(cfg.images or [])
    images = [load_image(p, "the prompt") for p in paths]  # before the model loads: fail fast
    return Request(str(cfg.prompt), images, sampling, stops(cfg.stop, "stop"))


def read_requests(path: Path, defaults: Sampling, stop: tuple[str, ...], image_root: Path):
    """Requests from a JSONL file, and an error record for each line that cannot be one."""
    if not path.is_file():
        raise DataError(f"input={path} does not exist")
    requests, errors, seen = [], [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            errors.append({"id": None, "line": n, "error": f"{path}:{n}: not JSON ({e.msg})"})
            continue
        if not isinstance(record, dict):
            errors.append({"id": None, "line": n, "error": f"{path}:{n}: not a JSON object"})
            continue
        rid = record.get("id", n)
        where = f"record {rid!r} (line {n})"
        try:
            unknown = sorted(set(record) - set(RECORD_KEYS))
            if unknown:
                raise DataError(f"{where}: unknown key(s) {', '.join(unknown)}; a record has {', '.join(RECORD_KEYS)}")
            if not isinstance(record.get("prompt"), str):
                raise DataError(f"{where}: no prompt (a string)")
            if str(rid) in seen:
                raise DataError(f"{where}: the id {rid!r} appears on an earlier line")
            images = record.get("images", record.get("image", []))
            images = [images] if isinstance(images, str) else images
            if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
                raise DataError(f"{where}: images must be a path or a list of paths")
            sampling = dataclasses.replace(defaults, **{k: record[k] for k in SAMPLING_KEYS if k in record})
            try:
                sampling.check()
            except ConfigError as e:
                raise DataError(f"{where}: {e}") from None
            record_stop = stops(record["stop"], where) if "stop" in record else stop
        except DataError as e:
            errors.append({"id": rid, "line": n, "error": str(e)})
            continue
        seen.add(str(rid))
        requests.append(Request(record["prompt"], [image_root / i for i in images], sampling, record_stop, rid, n))
    return requests, errors


def answered_ids(path: Path) -> set[str]:
    """Ids the output already answers (error records are retried); a torn last line is ignored."""
    done = set()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "answer" in record:
                done.add(str(record.get("id")))
    return done


def open_output(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
    out = path.open("a", encoding="utf-8")
    if torn:  # a crash mid-line: start on a fresh line
        out.write("\n")
    return out


def groups(requests: list[Request], size: int):
    """Batches of requests that can decode together (same sampling, max_new_tokens aside), in input order."""
    by_key: dict = {}
    for r in requests:
        by_key.setdefault(dataclasses.replace(r.sampling, max_new_tokens=0), []).append(r)
    for members in by_key.values():
        for start in range(0, len(members), size):
            yield members[start:start + size]


def run_batch(cfg: DictConfig, sampling: Sampling, console) -> None:
    from rich.progress import Progress

    if cfg.output is None:
        raise ConfigError("input=... needs output=<answers>.jsonl")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} must be a whole number >= 1")
    source, target = Path(cfg.input), Path(cfg.output)
    image_root = Path(cfg.image_root) if cfg.image_root else source.parent
    requests, errors = read_requests(source, sampling, stops(cfg.stop, "stop"), image_root)
    done = answered_ids(target)
    todo = [r for r in requests if str(r.id) not in done]
    console.print(f"{len(requests) + len(errors)} records in {source}: {len(requests) - len(todo)} already "
                  f"answered in {target}, {len(todo)} to answer, {len(errors)} unreadable")
    failed = len(errors)
    with open_output(target) as out:
        def write(record):
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            out.flush()

        for record in errors:
            write(record)
        generator = load(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, decode=cfg.decode,
                         system=cfg.system) if todo else None
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("answering", total=len(todo))
            for chunk in groups(todo, cfg.batch_size):
                ready = []
                for request in chunk:
                    try:
                        ready.append(generator.prepare(request))
                    except DataError as e:
                        failed += 1
                        write({"id": request.id, "line": request.line, "error": str(e)})
                if ready:
                    for p, a in zip(ready, generator.answer(ready)):
                        write({"id": p.request.id, "line": p.request.line, "answer": a.text, "tokens": a.tokens,
                               "finish": a.finish})
                progress.advance(task, len(chunk))
    console.print(f"wrote {len(todo) + len(errors) - failed} answers and {failed} errors to {target}")


def run(cfg: DictConfig) -> None:
    from rich.console import Console

    status = Console(stderr=True)
    if cfg.checkpoint is None:
        raise ConfigError("give checkpoint=<run folder | .ckpt | HF folder | store name>")
    sampling = sampling_of(cfg)
    if cfg.input is not None:
        if cfg.prompt is not None or cfg.image is not None or cfg.images:
            raise ConfigError("input=... answers a JSONL file: leave prompt/image/images out")
        return run_batch(cfg, sampling, status)
    request = single_request(cfg, sampling)
    generator = load(cfg.checkpoint, device=cfg.device, dtype=cfg.dtype, decode=cfg.decode, system=cfg.system)
    prepared = generator.prepare(request)
    out = Console(file=sys.stdout, markup=False, highlight=False, soft_wrap=True)
    generator.answer([prepared], on_text=lambda piece: out.print(piece, end=""))
    out.print()

