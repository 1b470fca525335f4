"""Training speed levers. Each is switched by a `model/*.yaml` key and computes what it replaces
(tests/test_speed.py checks each against transformers' own path):

  vision_truncate      run the vision tower only up to `vision_feature_layer` (no autograd when frozen)
  loss_chunk           loss on assistant positions only, through a chunked linear cross-entropy
                       that never holds the full (tokens x vocab) logits
  attn_implementation  `sdpa_packed`: packed rows attend per sample (one varlen flash call on a GPU,
                       SDPA per sample elsewhere) instead of through a dense block-causal mask
  lora_autocast        LoRA matmuls in the autocast dtype (fp32 adapter weights stay the master copy)
  gradient_checkpointing  recompute activations of some decoder layers (true: all, N: N of them,
                       auto: the fewest that fit the GPU by the plan's memory estimate)
  compile              torch.compile each decoder layer (CUDA)
"""

from __future__ import annotations

import inspect

import torch
from omegaconf import DictConfig

IGNORE = -100
PACKED_ATTENTION = "sdpa_packed"


# --- model parts -----------------------------------------------------------------------------

def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The LlavaNextForConditionalGeneration inside a peft wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return unwrap(model).model.language_model.layers


# --- vision tower only as deep as the feature layer ------------------------------------------

def vision_layers(tower: torch.nn.Module) -> torch.nn.ModuleList:
    """The vision encoder's layers (CLIPVisionModel.encoder.layers; older releases nest a vision_model)."""
    inner = getattr(tower, "vision_model", tower)
    return inner.encoder.layers


def vision_depth(num_layers: int, feature_layer: int | list[int]) -> int:
    """How many encoder layers produce the hidden states LLaVA reads (hidden_states[0] is the embedding)."""
    layers = feature_layer if isinstance(feature_layer, (list, tuple)) else [feature_layer]
    return max(i if i >= 0 else num_layers + 1 + i for i in layers)


def _pass_through(hidden_states, *args, **kwargs):
    return hidden_states


def _vision_forward(tower: torch.nn.Module, forward):
    """The tower's forward, without autograd when none of its weights train."""
    def run(*args, **kwargs):
        frozen = not any(p.requires_grad for p in tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            return forward(*args, **kwargs)
    return run


def truncate_vision_tower(model: torch.nn.Module) -> int:
    """Skip the encoder layers after the used feature layer; returns how many are skipped.

    The skipped layers keep their weights (checkpoints and exports hold the full tower) and still
    appear in `hidden_states`, as copies of their input, so every index up to the feature layer
    means what it meant before. Only the tower's own last_hidden_state/pooled output change,
    which LLaVA never reads.
    """
    hf = unwrap(model)
    tower = hf.model.vision_tower
    layers = vision_layers(tower)
    depth = vision_depth(len(layers), hf.config.vision_feature_layer)
    for layer in layers[depth:]:
        layer.forward = _pass_through
    if "forward" not in tower.__dict__:
        tower.forward = _vision_forward(tower, tower.forward)
    return len(layers) - depth


def untruncate_vision_tower(model: torch.nn.Module) -> None:
    tower = unwrap(model).model.vision_tower
    for module in [tower, *vision_layers(tower)]:
        module.__dict__.pop("forward", None)


# --- loss on assistant positions, chunked linear cross-entropy --------------------------------

class LinearCrossEntropy(torch.autograd.Function):
    """mean cross-entropy of (hidden @ weight.T) against targets, `chunk` rows of logits at a time.

    Gradients are computed chunk by chunk in the forward pass (as liger-kernel does), so neither
    pass ever holds more than `chunk` x vocab logits; logits are upcast to fp32 as transformers does.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk):
        n = hidden.shape[0]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        for start in range(0, n, chunk):
            h = hidden[start:start + chunk]
            t = targets[start:start + chunk]
            logits = (h @ weight.T).float()
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            probs = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
            probs[torch.arange(len(t), device=t.device), t] -= 1.0
            probs = probs.to(hidden.dtype)
            grad_hidden[start:start + chunk] = probs @ weight
            if grad_weight is not None:
                grad_weight += (probs.T @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_out / ctx.n
        grad_w = (grad_weight * scale).to(ctx.weight_dtype) if grad_weight is not None else None
        return (grad_hidden * scale).to(grad_hidden.dtype), grad_w, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk: int = 4096) -> torch.Tensor:
    """Mean cross-entropy over rows of `hidden` (n, d) through the head `weight` (vocab, d)."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0  # no trained token in the batch: zero loss, graph kept
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def assistant_loss(model: torch.nn.Module, batch: dict, chunk: int = 4096) -> torch.Tensor:
    """transformers' loss (shifted, mean over labelled tokens), with only labelled positions
    going through the LM head. On an FSDP2 root it runs as one of the root's forwards (below)."""
    sharded = model.__dict__.get(SHARDED_LOSS)
    return sharded(batch, chunk) if sharded else _assistant_loss(model, batch, chunk)


def _assistant_loss(model: torch.nn.Module, batch: dict, chunk: int) -> torch.Tensor:
    hf = unwrap(model)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = hf.model(**inputs, **packed_inputs(model, batch), use_cache=False).last_hidden_state
    labels = batch["labels"]
    keep = labels[:, 1:] != IGNORE
    rows = hidden[:, :-1][keep]
    targets = labels[:, 1:][keep]
    head = hf.lm_head.weight
    return linear_cross_entropy(rows, head, targets, chunk)


SHARDED_LOSS = "llavanext_assistant_loss"


def shard_assistant_loss(root: torch.nn.Module) -> None:
    """Let `assistant_loss` run on an FSDP2 root. The loss reads `lm_head.weight` itself instead of
    calling the root's forward, and FSDP2 gathers the root's own weights (embeddings, LM head,
    projector) and reduces their gradients only around a forward: registered as one, it gets both."""
    import functools

    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(root, SHARDED_LOSS, functools.partial(_assistant_loss, root))
    register_fsdp_forward_method(root, SHARDED_LOSS)


# --- attention for packed rows ---------------------------------------------------------------

def segment_bounds(position_ids: torch.Tensor | None, cu_seq_lens: torch.Tensor | None, length: int) -> list[int]:
    """Sample boundaries of a packed row: from cu_seq_lens if given, else where position_ids restart."""
    if cu_seq_lens is not None:
        return [int(b) for b in cu_seq_lens.tolist()]
    if position_ids is None or position_ids.shape[0] != 1:
        return [0, length]
    starts = torch.nonzero(position_ids[0] == 0).flatten().tolist()
    return [*starts, length] if starts and starts[0] == 0 else [0, *starts, length]


def packed_inputs(model: torch.nn.Module, batch: dict) -> dict:
    """The sample boundaries of a packed row, read once a step (one sync) for every layer's attention:
    `cu_seq_lens_q` on the batch's device and `max_length_q`. Empty for padded batches."""
    hf = unwrap(model)
    if hf.config.text_config._attn_implementation != PACKED_ATTENTION or "attention_mask" in batch:
        return {}
    ids = batch["input_ids"]
    bounds = segment_bounds(batch.get("position_ids"), None, ids.shape[1])
    lengths = [e - s for s, e in zip(bounds[:-1], bounds[1:])]
    return {"cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32, device=ids.device),
            "max_length_q": max(lengths)}


def _flash_varlen():
    """torch's varlen flash attention, causal, as f(q, k, v, cu_seq_lens, max_len) on (tokens, heads, dim);
    None where this torch lacks it. It is a custom op with its own backward, so compiled decoder layers
    trace straight through it (no graph break). torch 2.9-2.11 take `is_causal`, later releases `window_size`."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    params = inspect.signature(varlen_attn).parameters
    if "is_causal" in params:
        return lambda q, k, v, cu, n: varlen_attn(q, k, v, cu, cu, n, n, is_causal=True)
    if "window_size" in params:
        return lambda q, k, v, cu, n: varlen_attn(q, k, v, cu, cu, n, n, window_size=(-1, 0))
    return None


FLASH_VARLEN = _flash_varlen()


def _flash_fits(query: torch.Tensor, dropout: float, scaling: float | None) -> bool:
    """Whether the flash kernel computes exactly what SDPA would for these inputs."""
    head_dim = query.shape[-1]
    return (FLASH_VARLEN is not None and query.is_cuda and query.dtype in (torch.bfloat16, torch.float16)
            and head_dim <= 256 and head_dim % 8 == 0 and dropout == 0.0
            and (scaling is None or abs(scaling - head_dim ** -0.5) < 1e-12))


@torch.compiler.disable
def _per_sample_sdpa(module, query, key, value, bounds, dropout, scaling, **kwargs):
    """SDPA's causal kernel on each sample of the row in turn (CPU, or where flash does not fit)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    outs = [sdpa_attention_forward(module, query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], None,
                                   dropout=dropout, scaling=scaling, **kwargs)[0]
            for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs, dim=1)


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                          position_ids=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Causal attention within each sample of a packed row (batch 1, attention_mask None).

    On a GPU, one varlen flash call covers every sample; elsewhere each sample runs through SDPA's
    causal kernel on its own. Varlen flash serves rows of one sample too: SDPA would pick cuDNN's
    kernel on Hopper, twice as fast at a length seen before but paying a plan build at every new
    length; with lengths that vary from step to step (real data) it made the step 1.4x slower. Either way no work is spent on the blocks a block-causal mask would
    discard. Padded batches and cached decoding fall through to transformers' SDPA.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kwargs.pop("cu_seq_lens_k", None)  # self-attention: the same boundaries as the queries
    kwargs.pop("max_length_k", None)
    if not (attention_mask is None and query.shape[0] == 1 and query.shape[2] == key.shape[2] > 1):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    if cu_seq_lens_q is not None and max_length_q is not None and _flash_fits(query, dropout, scaling):
        groups = query.shape[1] // key.shape[1]  # grouped-query attention: each KV head serves `groups` heads
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (tokens, heads, dim)
        if groups > 1:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = FLASH_VARLEN(q, k, v, cu_seq_lens_q.to(torch.int32), int(max_length_q))
        return out.unsqueeze(0), None
    bounds = segment_bounds(position_ids, cu_seq_lens_q, query.shape[2])
    return _per_sample_sdpa(module, query, key, value, bounds, dropout, scaling, **kwargs), None


def _packed_mask(*args, attention_mask=None, **kwargs):
    """No dense mask for packed rows (the attention reads the boundaries); SDPA's mask otherwise."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)


def register_packed_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_ATTENTION, _packed_mask)


def set_language_attention(model: torch.nn.Module, name: str) -> None:
    """Attention implementation of the language model only (the vision tower keeps its own)."""
    if name == PACKED_ATTENTION:
        register_packed_attention()
    unwrap(model).config.text_config._attn_implementation = name


# --- LoRA, checkpointing, compile ------------------------------------------------------------

def lora_autocast(model: torch.nn.Module, on: bool = True) -> int:
    """LoRA matmuls take their input as it comes (bf16 under autocast) instead of an fp32 copy.

    peft casts every adapted layer's input to the adapter's fp32 dtype: a copy per layer and
    projection that is also kept for backward. Under autocast the matmul casts the small adapter
    weights instead; the fp32 weights stay the optimizer's master copy. Needs autocast (or
    adapters in the model's dtype): the module's training step runs under it.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    count = 0
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = not on
            count += 1
    return count


def checkpoint_layers(model: torch.nn.Module, count: int | bool) -> list[int]:
    """Recompute the activations of `count` decoder layers (True: all), spread evenly; returns them."""
    layers = decoder_layers(model)
    n = len(layers) if count is True else int(count)
    chosen = sorted({round(i * len(layers) / n) for i in range(n)}) if n > 0 else []
    if chosen:
        unwrap(model).gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    for module in unwrap(model).modules():  # selective: only the chosen decoder layers
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing = False
    for i in chosen:
        layers[i].gradient_checkpointing = True
    return chosen


def compile_decoder_layers(model: torch.nn.Module, on: bool = True) -> None:
    """torch.compile each decoder layer in place (state-dict names unchanged); one graph serves all
    layers and, with dynamic shapes, every sequence length."""
    for layer in decoder_layers(model):
        if on:
            layer.compile(dynamic=True)
        else:
            layer._compiled_call_impl = None


# --- from the config ------------------------------------------------------------------------

def loss_chunk(model_cfg: DictConfig) -> int | None:
    """Rows per chunk of the assistant-only loss, or None for transformers' own loss."""
    chunk = model_cfg.get("loss_chunk", 0)
    return int(chunk) if chunk else None


def apply(model: torch.nn.Module, model_cfg: DictConfig) -> list[str]:
    """Switch on the levers the model config asks for; returns what was done (for the log)."""
    done = []
    if model_cfg.get("vision_truncate", False):
        skipped = truncate_vision_tower(model)
        done.append(f"vision tower: {skipped} unused layer(s) skipped")
    attn = model_cfg.get("attn_implementation", "sdpa")
    if attn == PACKED_ATTENTION:
        set_language_attention(model, attn)
        done.append("attention: per-sample SDPA on packed rows")
    if model_cfg.get("lora_autocast", False) and lora_autocast(model):
        done.append("LoRA matmuls in the autocast dtype")
    ckpt = model_cfg.get("gradient_checkpointing", False)
    if ckpt and ckpt != "auto":  # auto: the trainer fixes a count for its device before the model is built
        layers = checkpoint_layers(model, ckpt)
        done.append(f"activation checkpointing: {len(layers)} decoder layer(s)")
    if model_cfg.get("compile", False) and torch.cuda.is_available():
        compile_decoder_layers(model)
        done.append("torch.compile: decoder layers")
    return done
