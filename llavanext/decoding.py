"""The decode loop: one prefill, then one token per step out of a static KV cache.

The prefill runs the whole LLaVA-NeXT model (vision tower, projector, language model) once over
the left-padded prompts. Each decode step runs only the language model on one token per row,
with fixed shapes (static cache, a mask we build), so on a GPU the step can be a CUDA graph:
`graph` captures the eager step as it is (ready in a second), `compile` lets torch.compile
(mode="reduce-overhead", CUDA graphs) fuse it first (a minute or more per shape). Sampling uses
transformers' own logits processors, so a seed gives what `model.generate` would.

The step itself comes in variants (`Decoder(..., variant=)`):
  hf       transformers' own forward of the language model (its attention, its masks).
  fused    our forward of a llama/mistral decoder for one token: q/k/v and gate/up as one GEMV each
           (the Linears' weights become row blocks of one tensor: same memory, prefill unchanged),
           attention as two batched matmuls over the whole static cache (no data-dependent shapes),
           one-kernel RMSNorm, rotary as one small matmul, residual adds inside the GEMMs: about half
           the kernels of `hf` per layer. Same math as `hf`: float32 logits agree to rounding; bf16
           rounds at other points (attention scores in bf16 as transformers' eager attention does).
  unfused  `fused` with separate q/k/v and gate/up projections (their outputs concatenated).
  auto     `fused` on a GPU where the model allows it, else `hf` (CPU decoding is unchanged).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
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
VARIANTS = ("auto", "hf", "fused", "unfused")
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

    def __init__(self, model, batch: int, length: int, device, fast: FastStep | None = None):
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        if fast is not None:  # the fast step writes into the cache tensors itself: they must exist before prefill
            self.cache.early_initialization(batch, fast.kv_heads, fast.head_dim, fast.dtype, device)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.step = torch.zeros((), dtype=torch.long, device=device)  # the cache slot being written
        self.keep = torch.ones((batch, length), dtype=torch.bool, device=device)  # False at left padding
        self.slots = torch.arange(length, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


def fast_unsupported(language_model) -> str | None:
    """Why our own decode forward can't run this language model (None: it can)."""
    config = language_model.config
    if config.model_type not in ("llama", "mistral"):
        return f"model_type {config.model_type!r} (fused decoding knows llama and mistral)"
    if getattr(config, "sliding_window", None):
        return "a sliding window (fused decoding attends to the whole cache)"
    for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
        if not hasattr(language_model, name):
            return f"no {name} on the language model"
    for layer in language_model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
        if not all(type(p) is torch.nn.Linear for p in parts):  # not LoRA-wrapped, not quantised
            return "projections that are not plain Linears (merge LoRA adapters first)"
        if not all(hasattr(n, "variance_epsilon") for n in (layer.input_layernorm, layer.post_attention_layernorm)):
            return "norms that are not RMSNorm"
    return None


def fuse(linears: list[torch.nn.Linear]) -> torch.Tensor | None:
    """One weight for Linears that read the same input: their weights stacked by rows, so one GEMV
    reads them all. The Linears' weights become views of it (the same memory, and their own
    forward, used by prefill, is unchanged). None where they can't share one (biases, dtypes)."""
    if any(type(p) is not torch.nn.Linear or p.bias is not None for p in linears):
        return None
    weights = [p.weight for p in linears]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) > 1:
        return None
    fused = getattr(linears[0], "_llavanext_fused", None)
    rows = [w.shape[0] for w in weights]
    if fused is not None and fused.shape[0] == sum(rows) and all(  # a Decoder before this one fused them
            w.data_ptr() == piece.data_ptr() for w, piece in zip(weights, fused.split(rows))):
        return fused
    fused = torch.cat([w.detach() for w in weights])
    for p, w, piece in zip(linears, weights, fused.split(rows)):
        p.weight = torch.nn.Parameter(piece, requires_grad=w.requires_grad)
    linears[0]._llavanext_fused = fused  # plain attribute, not a parameter: state_dict is unchanged
    if fused.device.type == "cuda":
        torch._dynamo.mark_static_address(fused)  # decode=compile: a weight, not an input to copy into its graph
    return fused


def rms_norm(x: torch.Tensor, norm) -> torch.Tensor:
    """transformers' LlamaRMSNorm in one kernel, not 8 (in bf16 it rounds once, after the weight, not before)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


def add_linear(h: torch.Tensor, x: torch.Tensor, linear) -> torch.Tensor:
    """h + linear(x) for the residual stream: one GEMM accumulating into h (beta=1), not a GEMM and an add."""
    if type(linear) is torch.nn.Linear and linear.bias is None:
        return h.addmm_(x, linear.weight.t())
    return h + linear(x)


class FastStep:
    """One decode step of a llama/mistral language model for one token per row, in plain torch ops
    with fixed shapes (CUDA-graphable, compilable, no host syncs): transformers' math, fewer kernels."""

    def __init__(self, language_model, lm_head, variant: str):
        config = language_model.config
        self.lm = language_model
        self.lm_head = lm_head
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim**-0.5
        self.dtype = language_model.layers[0].self_attn.k_proj.weight.dtype
        half = self.head_dim // 2
        device = language_model.layers[0].self_attn.k_proj.weight.device
        # rotary as x @ R, R = diag(cos) + swap @ diag(sin with its first half negated), swap[i, j] = (i == j +- half):
        # rotate_half(x) * sin + x * cos in one small matmul per layer instead of five elementwise kernels
        self.swap = torch.eye(self.head_dim, dtype=self.dtype, device=device).roll(half, dims=0)
        if device.type == "cuda":
            torch._dynamo.mark_static_address(self.swap)  # decode=compile: a constant, not an input to copy
        self.layers = []
        for layer in language_model.layers[: config.num_hidden_layers]:
            attn, mlp = layer.self_attn, layer.mlp
            qkv = gate_up = None
            if variant != "unfused":
                qkv = fuse([attn.q_proj, attn.k_proj, attn.v_proj])
                gate_up = fuse([mlp.gate_proj, mlp.up_proj])
            self.layers.append((layer, qkv, gate_up))

    def step(self, slot: Slot) -> torch.Tensor:
        """The float32 logits of the next token of every row."""
        rows, half = slot.ids.shape[0], self.head_dim // 2
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        h = self.lm.embed_tokens(slot.ids[:, 0])  # (rows, hidden): the residual stream, updated in place
        cos, sin = self.lm.rotary_emb(h, slot.positions)  # (rows, 1, head_dim)
        sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
        rotary = torch.diag_embed(cos[:, 0]) + self.swap * sin  # (rows, head_dim, head_dim)
        visible = (slot.slots <= slot.step)[None, None, None, :] & slot.keep[:, None, None, :]
        bias = torch.zeros(visible.shape, dtype=torch.float32, device=h.device).masked_fill_(~visible, float("-inf"))
        index = slot.step.view(1)
        for i, (layer, qkv_weight, gate_up_weight) in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(h, layer.input_layernorm)
            if qkv_weight is not None:
                qkv = F.linear(x, qkv_weight)
            else:
                qkv = torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], dim=-1)
            qkv = qkv.view(rows, heads + 2 * kv_heads, dim)
            qk, v = torch.matmul(qkv[:, : heads + kv_heads], rotary), qkv[:, heads + kv_heads:]  # q and k rotated
            q, k = qk[:, :heads], qk[:, heads:]
            keys, values = slot.cache.layers[i].keys, slot.cache.layers[i].values  # (rows, kv_heads, length, dim)
            keys.index_copy_(2, index, k[:, :, None])
            values.index_copy_(2, index, v[:, :, None])
            out = self.attend(q.reshape(rows, kv_heads, heads // kv_heads, dim), keys, values, bias)
            h = add_linear(h, out.reshape(rows, heads * dim), attn.o_proj)
            x = rms_norm(h, layer.post_attention_layernorm)
            if gate_up_weight is not None:
                gate, up = F.linear(x, gate_up_weight).chunk(2, dim=-1)
            else:
                gate, up = mlp.gate_proj(x), mlp.up_proj(x)
            h = add_linear(h, mlp.act_fn(gate) * up, mlp.down_proj)
        return self.lm_head(rms_norm(h, self.lm.norm)).float()

    def attend(self, q, keys, values, bias):
        """Attention of one query per head over the whole cache; q is (rows, kv_heads, group, dim),
        so grouped-query heads share their key/value head without a copy. Scores and softmax as
        transformers' eager attention (float32 softmax). Two batched matmuls: on an H100 they beat a
        split-KV form (probs @ values in chunks of 256 keys, summed) by 3.5% of the whole step."""
        scores = torch.matmul(q, keys.transpose(-1, -2))  # (rows, kv_heads, group, length)
        probs = torch.add(bias, scores, alpha=self.scale).softmax(-1).to(values.dtype)  # bias: 0 or -inf, float32
        return torch.matmul(probs, values)


class Decoder:
    def __init__(self, model: torch.nn.Module, mode: str = "eager", variant: str = "auto"):
        if mode not in MODES:
            raise ConfigError(f"decode={mode!r}; choose from auto, {', '.join(MODES)}")
        if variant not in VARIANTS:
            raise ConfigError(f"variant={variant!r}; choose from {', '.join(VARIANTS)}")
        self.device = next(model.parameters()).device
        if mode != "eager" and self.device.type != "cuda":
            raise ConfigError(f"decode={mode} needs a CUDA device (the model is on {self.device})")
        self.model = model.eval()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.cache_kw = cache_keyword(self.language_model)
        self.mode = mode
        self.slots: dict[tuple[int, int], Slot] = {}
        why = fast_unsupported(self.language_model)
        if variant == "auto":  # CPU decoding stays transformers' own forward
            variant = "fused" if self.device.type == "cuda" and why is None else "hf"
        elif variant != "hf" and why is not None:
            raise ConfigError(f"variant={variant} can't decode this model: {why}")
        self.variant = variant
        self.fast = FastStep(self.language_model, self.lm_head, variant) if variant != "hf" else None
        if self.fast is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # fusing left the Linears' old weight blocks cached but free
        self.step = self.fast.step if self.fast is not None else self.hf_step
        self.compiled = torch.compile(self.step, mode="reduce-overhead", fullgraph=True, dynamic=False) \
            if mode == "compile" else None

    def hf_step(self, slot: Slot) -> torch.Tensor:
        """One token per row through transformers' forward: the float32 logits of the next one
        (fixed shapes, no host sync)."""
        visible = (slot.slots <= slot.step)[None, None, None, :] & slot.keep[:, None, None, :]
        out = self.language_model(input_ids=slot.ids, attention_mask=visible, position_ids=slot.positions,
                                  use_cache=True, **{self.cache_kw: slot.cache})
        return self.lm_head(out.last_hidden_state[:, -1]).float()

    def slot(self, batch: int, length: int) -> Slot:
        length = -(-length // BUCKET) * BUCKET
        if self.mode == "eager":  # nothing to reuse: no graph holds on to the cache's addresses
            return Slot(self.model, batch, length, self.device, self.fast)
        key = (batch, length)
        if key not in self.slots:
            self.slots[key] = slot = Slot(self.model, batch, length, self.device, self.fast)
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
            return slot.logits.clone()  # the next replay overwrites slot.logits
        if self.mode == "compile":
            torch.compiler.cudagraph_mark_step_begin()
            return self.compiled(slot).clone()
        return self.step(slot)

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
        ready = torch.cuda.Event() if self.device.type == "cuda" else None
        for step in range(new):
            scores = processors(history[:, : prompt + step], logits)
            if sampling.greedy:
                token = scores.argmax(-1)
            else:
                token = torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(1)
            history[:, prompt + step] = token
            host = token.to("cpu", non_blocking=True)
            if ready is not None:
                ready.record()
            if step < new - 1:  # queue the next step before waiting for this token: the GPU runs while the host reads it
                slot.ids.copy_(token[:, None])
                slot.positions.copy_(next_position + step)
                slot.step.fill_(prompt + step)
                logits = self.run_step(slot)
            if ready is not None:
                ready.synchronize()
            yield host.tolist()
