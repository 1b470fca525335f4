"""The plan printed before a run (and alone with `executor.dry_run=true`): where it runs, how the
batch splits, how long it trains, what trains, and how much GPU memory each device should need.

The memory figure is an estimate from parameter counts and the usual activation formulas
(Korthikanti et al. 2022, flash attention, 16-bit activations); the measured figures for the
7B sit beside it in docs/benchmarks.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig

from llavanext import model as modeling
from llavanext.errors import ConfigError

GiB = 1024**3
DTYPE_BYTES = {torch.float32: 4, torch.bfloat16: 2, torch.float16: 2}


def world_size(cfg: DictConfig) -> int:
    return cfg.executor.nodes * cfg.executor.devices


def gradient_accumulation(cfg: DictConfig, world: int) -> int:
    """Micro-batches per optimizer step: the user sets the global batch, accumulation follows."""
    micro, global_batch = cfg.data.micro_batch_size, cfg.data.get("global_batch_size")
    if not global_batch:
        return 1
    per_step = micro * world
    if global_batch % per_step:
        raise ConfigError(f"data.global_batch_size={global_batch} is not a multiple of micro_batch_size x world "
                          f"size = {micro} x {world} = {per_step} (world size = executor.nodes x executor.devices)")
    return global_batch // per_step


def warmup_steps(cfg: DictConfig) -> int:
    """The recipe's warmup, shortened to a tenth of the run when the run is shorter than it."""
    steps, warmup = cfg.trainer.max_steps, cfg.optim.warmup_steps
    return max(1, steps // 10) if warmup >= steps else warmup


def meta_part_rows(cfg: DictConfig) -> list[modeling.PartRow]:
    """The per-part parameter table without allocating the weights (the model built on the meta device)."""
    config = modeling.hf_config(cfg.model)
    with torch.device("meta"):
        model = modeling.build_model(cfg.model, config)
        model = modeling.apply_parts(model, cfg.parts, cfg.peft)
    return modeling.part_table(model, cfg.parts)


@dataclass
class Plan:
    executor: str
    strategy: str
    nodes: int
    devices: int
    world: int
    micro_batch: int
    accumulation: int
    global_batch: int
    steps: int
    warmup: int
    tokens_per_step: int
    rows: list
    memory: dict = field(default_factory=dict)  # part of the estimate -> bytes per device

    @property
    def memory_total(self) -> int:
        return sum(self.memory.values())


LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def residual_bytes(cfg: DictConfig) -> int:
    """Bytes per element of the decoder's residual stream in training on a GPU (precision auto is
    bf16-mixed there): float32 master weights keep a float32 stream under autocast, FSDP2 gathers the
    weights in bf16, `*-true` precisions compute in the weights' own width."""
    precision = str(cfg.trainer.get("precision", "auto"))
    if precision.startswith("32") or precision == "64":
        return 4
    if precision.endswith("-true") or cfg.strategy.name == "fsdp" or cfg.model.dtype == "auto":
        return 2
    return DTYPE_BYTES[modeling.torch_dtype(cfg.model.dtype)]


def layer_bytes(cfg: DictConfig, tokens: int) -> tuple[int, int]:
    """What one decoder layer keeps for backward over `tokens` tokens: (activations, weight copies).

    Fitted to what autograd saves on an H100 under bf16 autocast with packed varlen attention
    (`bench/activation_probe.py`, 7b, 13b and mistral_7b, full and LoRA; docs/benchmarks.md): the
    formula is within 0-5% above every measurement. Per token, a full layer keeps 31.5 bytes per hidden
    unit (42.5 with a float32 residual stream) and 6 per MLP unit. LoRA's frozen layers keep 4 fewer per
    hidden unit, and peft's dropout a 16-bit copy of each adapted layer's input; with float32 weights the
    two come out even. Float32 weights are also cast to 16 bits once per layer for the matmuls, and
    those copies live until backward.
    """
    text = cfg.model.text
    h, i = text.hidden_size, text.intermediate_size
    precision = str(cfg.trainer.get("precision", "auto"))
    residual = residual_bytes(cfg)
    per_token = (42.5 if residual == 4 else 31.5) * h + 6 * i
    if cfg.parts.language_model == "lora" and residual == 2:
        peft = cfg.peft
        targets = peft.target_modules
        adapted = [m for m in LM_LINEARS if isinstance(targets, str) or m in targets]  # "all-linear": all seven
        inputs = sum(i if m == "down_proj" else h for m in adapted)
        per_token += -4 * h + (2 * inputs if peft.get("dropout", 0) > 0 else 0) + 2 * peft.r * len(adapted)
    autocast = precision == "auto" or precision.endswith("-mixed")
    if not autocast and residual == 4:
        per_token *= 2  # no autocast at all: every kept tensor is float32, not only the residual stream
    weights = 4 * h * h + 3 * h * i  # q, k, v, o at full width (an upper bound under GQA) and the MLP
    copies = 2 * weights if autocast and residual == 4 else 0
    return int(per_token * tokens), copies


def checkpointed_layers(cfg: DictConfig) -> int:
    """How many decoder layers model.gradient_checkpointing recomputes (auto counts as none until
    `resolve_checkpointing` has fixed it for the device)."""
    value = cfg.model.get("gradient_checkpointing", False)
    if value is True:
        return cfg.model.text.num_hidden_layers
    if value in (False, None, "auto"):
        return 0
    return min(int(value), cfg.model.text.num_hidden_layers)


def activation_bytes(cfg: DictConfig, checkpointed: int) -> int:
    """Activations kept for backward by one micro-batch with `checkpointed` decoder layers recomputed."""
    text = cfg.model.text
    tokens = cfg.data.micro_batch_size * cfg.data.seq_length
    activations, copies = layer_bytes(cfg, tokens)
    per_layer = activations + copies
    # a checkpointed layer keeps its input; one of them at a time is recomputed whole during backward
    kept = (text.num_hidden_layers - checkpointed) * per_layer
    kept += checkpointed * residual_bytes(cfg) * tokens * text.hidden_size + (per_layer if checkpointed else 0)
    logits = tokens * text.vocab_size * (2 + 4 + 4)  # 16-bit logits, float32 for the loss, and its gradient
    if cfg.parts.vision_tower != "frozen":  # the tower is never checkpointed (speed.checkpoint_layers)
        vision = cfg.model.vision
        tile = vision.image_size
        tiles = max(h * w for h, w in cfg.model.image_grid_pinpoints) // (tile * tile) + 1
        vision_tokens = cfg.data.micro_batch_size * tiles * (tile // vision.patch_size) ** 2
        kept += 34 * vision_tokens * vision.hidden_size * vision.num_hidden_layers
    return kept + logits


def resolve_checkpointing(cfg: DictConfig, device_bytes: int | None, rows=None, headroom: float = 0.85) -> int:
    """model.gradient_checkpointing=auto: the fewest decoder layers to recompute so the plan's estimate
    fits `headroom` of the device's memory (0 off a GPU: nothing to fit); all of them when nothing fits."""
    layers = cfg.model.text.num_hidden_layers
    if not device_bytes:
        return 0
    rest = make_plan(cfg, rows).memory_total - activation_bytes(cfg, 0)
    for n in range(layers + 1):
        if rest + activation_bytes(cfg, n) <= headroom * device_bytes:
            return n
    return layers


def make_plan(cfg: DictConfig, rows: list[modeling.PartRow] | None = None) -> Plan:
    ex = cfg.executor
    world = world_size(cfg)
    accumulation = gradient_accumulation(cfg, world)
    micro = cfg.data.micro_batch_size
    global_batch = micro * world * accumulation
    rows = rows if rows is not None else meta_part_rows(cfg)
    total = sum(r.params for r in rows)
    trainable = sum(r.trainable for r in rows)

    # on the GPU a model of dtype auto is bf16; its trainable weights get gradients and two AdamW moments alike
    width = DTYPE_BYTES[torch.bfloat16 if cfg.model.dtype == "auto" else modeling.torch_dtype(cfg.model.dtype)]
    sharded = cfg.strategy.name == "fsdp"
    shards = world if sharded else 1
    memory = {
        "weights": total * width // shards,
        "gradients": trainable * width // shards,
        "AdamW moments": 2 * trainable * width // shards,
        "activations (1 micro-batch)": activation_bytes(cfg, checkpointed_layers(cfg)),
    }
    if sharded:  # one transformer block gathered whole for forward and one prefetched, in bf16 on a GPU
        text = cfg.model.text
        block = 4 * text.hidden_size**2 + 3 * text.hidden_size * text.intermediate_size
        memory["FSDP gathered blocks"] = 2 * block * residual_bytes(cfg)
    return Plan(executor=ex.name, strategy=cfg.strategy.name, nodes=ex.nodes, devices=ex.devices, world=world,
                micro_batch=micro, accumulation=accumulation, global_batch=global_batch,
                steps=cfg.trainer.max_steps, warmup=warmup_steps(cfg),
                tokens_per_step=global_batch * cfg.data.seq_length, rows=rows, memory=memory)


def size(n: int) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB / 10 else f"{n / 2**20:.1f} MiB"


def render(plan: Plan):
    from rich.console import Group
    from rich.table import Table

    table = Table(title="Plan", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("executor", f"{plan.executor}: {plan.nodes} node(s) x {plan.devices} device(s) = "
                              f"world size {plan.world}, strategy {plan.strategy}")
    table.add_row("batch", f"micro {plan.micro_batch} x world {plan.world} x accumulation {plan.accumulation}"
                           f" = global {plan.global_batch} sequences per step")
    table.add_row("steps", f"{plan.steps:,} (warmup {plan.warmup:,})")
    table.add_row("tokens per step", f"at most {plan.tokens_per_step:,} (global batch x data.seq_length)")
    memory = ", ".join(f"{name} {size(value)}" for name, value in plan.memory.items())
    table.add_row("GPU memory/device", f"~{size(plan.memory_total)} estimated ({memory})")
    return Group(modeling.render_part_table(plan.rows), table)
