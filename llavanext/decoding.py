"""The decode loop: one prefill, then one token per step out of a static KV cache.

The prefill runs the whole LLaVA-NeXT model (vision tower, projector, language model) once over
the left-padded prompts. Each decode step runs only the language model on one token per row,
with fixed shapes (static cache, a 4D mask we build), so on a GPU the step can be a CUDA graph:
`graph` captures the eager step as it is (ready in a second), `compile` lets torch.compile
(mode="reduce-overhead", CUDA graphs) fuse it first (a minute or more per shape). Sampling uses
transformers' own logits processors, so a seed gives what `model.generate` would.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import StaticCache
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from llavanext.errors import ConfigError

MODES = ("eager", "graph", "compile")
BUCKET = 256  # cache lengths round up to this, so shapes (and graphs) repeat and masks stay aligned


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0
    seed: int | None = None

    def check(self) -> None:
        problems = []
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            problems.append(f"max_new_tokens={self.max_new_tokens!r} must be a whole number >= 1")
        if not isinstance(self.temperature, int | float) or self.temperature < 0:
            problems.append(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p!r} must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k={self.top_k!r} must be a whole number >= 0 (0 is off)")
        if not isinstance(self.repetition_penalty, int | float) or self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty={self.repetition_penalty!r} must be > 0 (1 is off)")
        if self.seed is not None and not isinstance(self.seed, int):
            problems.append(f"seed={self.seed!r} must be a whole number")
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def processors(self) -> LogitsProcessorList:
        """The logits processors `model.generate` would apply for these settings, in its order."""
        out = LogitsProcessorList()
        if self.repetition_penalty != 1.0:
            out.append(RepetitionPenaltyLogitsProcessor(penalty=float(self.repetition_penalty)))
        if not self.greedy:
            if self.temperature != 1.0:
                out.append(TemperatureLogitsWarper(float(self.temperature)))
            if self.top_k:
                out.append(TopKLogitsWarper(top_k=self.top_k))
            if self.top_p < 1.0:
                out.append(TopPLogitsWarper(top_p=float(self.top_p)))
        return out


def cache_keyword(module: torch.nn.Module) -> str:
    """transformers 5.17 calls the KV cache argument `past_key_values`, later releases `cache`."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


class Slot:
    """Everything a (batch, cache length) shape needs, kept so graphs and cache addresses repeat."""

    def __init__(self, model, batch: int, length: int, device):
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)  # the cache slot being written
        self.keep = torch.ones((batch, length), dtype=torch.bool, device=device)  # False at left padding
        self.slots = torch.arange(length, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class Decoder:
    def __init__(self, model: torch.nn.Module, mode: str = "eager"):
        if mode not in MODES:
            raise ConfigError(f"decode={mode!r}; choose from auto, {', '.join(MODES)}")
        self.device = next(model.parameters()).device
        if mode != "eager" and self.device.type != "cuda":
            raise ConfigError(f"decode={mode} needs a CUDA device (the model is on {self.device})")
        self.model = model.eval()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.cache_kw = cache_keyword(self.language_model)
        self.mode = mode
        self.slots: dict[tuple[int, int], Slot] = {}
        self.compiled = torch.compile(self.step, mode="reduce-overhead", fullgraph=True, dynamic=False) \
            if mode == "compile" else None

    def step(self, slot: Slot) -> torch.Tensor:
        """One token per row: the logits of the next one (fixed shapes, no host sync)."""
        visible = (slot.slots <= slot.step)[None, None, None, :] & slot.keep[:, None, None, :]
        out = self.language_model(input_ids=slot.ids, attention_mask=visible, position_ids=slot.positions,
                                  use_cache=True, **{self.cache_kw: slot.cache})
        return self.lm_head(out.last_hidden_state[:, -1])

    def slot(self, batch: int, length: int) -> Slot:
        length = -(-length // BUCKET) * BUCKET
        if self.mode == "eager":  # nothing to reuse: no graph holds on to the cache's addresses
            return Slot(self.model, batch, length, self.device)
        key = (batch, length)
        if key not in self.slots:
            self.slots[key] = slot = Slot(self.model, batch, length, self.device)
            if self.mode == "graph":
                self.capture(slot)
        return self.slots[key]

    def capture(self, slot: Slot) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up allocates the cache and cuBLAS workspaces outside the graph
            for _ in range(2):
                self.step(slot)
        torch.cuda.current_stream().wait_stream(side)
        slot.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(slot.graph):
            slot.logits = self.step(slot)

    def run_step(self, slot: Slot) -> torch.Tensor:
        if self.mode == "graph":
            slot.graph.replay()
            return slot.logits.float().clone()  # the next replay overwrites slot.logits
        if self.mode == "compile":
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(slot).float().clone()
        return self.step(slot).float()

    @torch.no_grad()
    def stream(self, batch: dict, sampling: Sampling) -> Iterator[list[int]]:
        """The next token of every row, step by step, for a left-padded batch (input_ids,
        attention_mask, and pixel_values + image_sizes when there are images). Rows that are done
        keep getting tokens: the caller ignores them and stops iterating when all are done."""
        ids = batch["input_ids"].to(self.device)
        attention = batch["attention_mask"].to(self.device).bool()
        rows, prompt = ids.shape
        new = sampling.max_new_tokens
        slot = self.slot(rows, prompt + new)
        slot.cache.reset()
        slot.keep.fill_(True)
        slot.keep[:, :prompt] = attention

        # prefill: causal over the prompt, never onto padding (a padding row sees itself, so no row is empty)
        query = torch.arange(prompt, device=self.device)[:, None]
        visible = (slot.slots[None, :] <= query) & (slot.keep[:, None, :] | (slot.slots[None, :] == query))
        positions = (attention.long().cumsum(-1) - 1).clamp(min=0)
        images = {}
        if batch.get("pixel_values") is not None:
            images = {"pixel_values": batch["pixel_values"].to(self.device, self.model.dtype),
                      "image_sizes": batch["image_sizes"].to(self.device)}
        out = self.model(input_ids=ids, attention_mask=visible[:, None], position_ids=positions, use_cache=True,
                         logits_to_keep=1, **images, **{self.cache_kw: slot.cache})
        logits = out.logits[:, -1].float()
        del out

        history = torch.cat([ids, ids.new_zeros((rows, new))], dim=1)  # what repetition_penalty looks at
        processors = sampling.processors()
        generator = None
        if not sampling.greedy and sampling.seed is not None:
            generator = torch.Generator(self.device).manual_seed(sampling.seed)
        next_position = attention.long().sum(-1, keepdim=True)
        for step in range(new):
            scores = processors(history[:, : prompt + step], logits)
            if sampling.greedy:
                token = scores.argmax(-1)
            else:
                token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            history[:, prompt + step] = token
            yield token.tolist()
            if step == new - 1:
                return
            slot.ids.copy_(token[:, None])
            slot.positions.copy_(next_position + step)
            slot.step.fill_(prompt + step)
            logits = self.run_step(slot)
