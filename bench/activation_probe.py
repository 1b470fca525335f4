"""What one decoder layer keeps for backward, measured, against the plan's estimate (llavanext/plan.py).

    python bench/activation_probe.py                        # on the GPU: 7b, 13b, mistral_7b; full and LoRA
    python bench/activation_probe.py --models tiny --seq 512  # anywhere

Builds the language model with 3 decoder layers, runs one forward under bf16 autocast with the CLI's
levers (packed varlen attention, lora_autocast) and counts, through autograd's saved-tensor hooks, the
distinct storages the middle layer saves: activations, and 16-bit copies of its weights (tensors
shaped like a parameter). `auto` activation checkpointing (plan.resolve_checkpointing) stands on these
figures; docs/benchmarks.md has the H100 table.
"""

from __future__ import annotations

import argparse
import json

import torch
from rich.console import Console
from rich.table import Table

from llavanext import model as modeling
from llavanext import plan as planning
from llavanext import speed
from llavanext.cli.overrides import compose

CASES = {  # name: (overrides, weights dtype)
    "full, float32 weights": ([], "float32"),
    "full, bf16 weights (as FSDP2 gathers them)": ([], "bfloat16"),
    "lora, float32 base": (["peft=lora"], "float32"),
    "lora, bf16 base": (["peft=lora"], "bfloat16"),
    "lora, bf16 base, no lora_autocast": (["peft=lora", "model.lora_autocast=false"], "bfloat16"),
    "lora, bf16 base, dropout 0": (["peft=lora", "peft.dropout=0"], "bfloat16"),
}


def config(model: str, case: str, seq: int, extra=()):
    over, dtype = CASES[case]
    strategy = ["strategy=fsdp", "executor=local", "executor.devices=2"] if "FSDP" in case else []
    return compose("finetune", [f"model={model}", "data=mock", "model.text.num_hidden_layers=3", f"data.seq_length={seq}",
                                "data.micro_batch_size=1", "model.gradient_checkpointing=false",
                                "trainer.precision=bf16-mixed", f"model.dtype={dtype}", *strategy, *over, *extra])


def saved_by_one_layer(cfg, device: torch.device) -> tuple[int, int]:
    """(activation bytes, weight-copy bytes) the middle decoder layer saves for backward."""
    with torch.device(device):
        model = modeling.build_model(cfg.model, modeling.hf_config(cfg.model))
    model = modeling.apply_parts(model, cfg.parts, cfg.peft).train()
    speed.set_language_attention(model, speed.PACKED_ATTENTION)
    if cfg.model.get("lora_autocast", False):
        speed.lora_autocast(model)
    layers = speed.decoder_layers(model)
    params = {p.data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters()}
    inside = {"layer": None}
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda m, a, index=index: inside.update(layer=index))
        layer.register_forward_hook(lambda m, a, o: inside.update(layer=None))
    activations, copies = {}, {}

    def pack(t):
        if inside["layer"] == 1 and t.data_ptr() not in params:
            storage = t.untyped_storage()
            (copies if tuple(t.shape) in shapes else activations).setdefault(storage.data_ptr(), storage.nbytes())
        return t

    seq, hidden = cfg.data.seq_length, cfg.model.text.hidden_size
    dtype = modeling.torch_dtype(cfg.model.dtype)
    x = torch.randn(1, seq, hidden, device=device, dtype=dtype, requires_grad=True)
    position_ids = torch.arange(seq, device=device)[None]
    bounds = {"cu_seq_lens_q": torch.tensor([0, seq], dtype=torch.int32, device=device), "max_length_q": seq}
    with torch.autocast(device.type, dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        speed.unwrap(model).model.language_model(inputs_embeds=x, position_ids=position_ids, use_cache=False, **bounds)
    return sum(activations.values()), sum(copies.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="7b,13b,mistral_7b")
    # not 4096: a (4096, 4096) activation would look like a weight to the copy count
    parser.add_argument("--seq", type=int, default=3000)
    parser.add_argument("--json", default=None, help="write the rows here too")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    table = Table(title=f"what one decoder layer keeps for backward, {args.seq} tokens, bf16 autocast, {name}")
    for column in ("model", "case", "measured MiB", "plan MiB", "plan / measured", "weight copies MiB",
                   "plan copies MiB"):
        table.add_column(column, justify="right")
    rows = []
    for model in args.models.split(","):
        for case in CASES:
            cfg = config(model, case, args.seq)
            measured, copies = saved_by_one_layer(cfg, device)
            estimate, estimate_copies = planning.layer_bytes(cfg, args.seq)
            rows.append({"model": model, "case": case, "measured": measured, "plan": estimate, "copies": copies,
                         "plan_copies": estimate_copies})
            table.add_row(model, case, f"{measured / 2**20:,.1f}", f"{estimate / 2**20:,.1f}",
                          f"{estimate / measured:.3f}", f"{copies / 2**20:,.1f}", f"{estimate_copies / 2**20:,.1f}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
    Console(width=150).print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
