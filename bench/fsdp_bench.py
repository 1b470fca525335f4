"""Full finetune speed on several GPUs: the plain transformers loop in FSDP2 against llavanext's levers.

    torchrun --nproc-per-node 4 bench/fsdp_bench.py --model 7b --out $OUT/fsdp
    torchrun --nproc-per-node 2 bench/fsdp_bench.py --model tiny --device cpu --steps 3 --warmup 1   # smoke

Every row trains LLaVA-NeXT in full (language model + LM head + projector; vision tower frozen) from
the same initial weights (float32 master copy) on the same batches, each rank its own samples,
sharded by `llavanext.strategies.shard_blocks` exactly as `llavanext finetune strategy=fsdp` shards:
fully_shard on every decoder/encoder layer, then the root; bf16 compute and all-gathers, fp32
gradient reduction (CUDA; fp32 throughout on CPU). Fused AdamW on CUDA.
  baseline  LlavaNextForConditionalGeneration(**batch).loss, SDPA, padded batches
  ours      the levers of llavanext/speed.py that apply to full finetune, added one at a time (rows)
Every row builds a fresh model (meta device, sharded, then filled from one snapshot of the initial
shards) and frees it before the next, so rows do not share compile caches or memory.

MFU convention (per step, useful work only; peak 989 TFLOP/s bf16 dense, H100/H200), per GPU:
  6 N per real token (N = the decoder layers' linear weights: forward 2N, input and weight gradients 4N)
  + 6 V d per labelled token (LM head, trained) + 6 t^2 d L per sample of length t (causal attention,
  forward + backward: half of the 12 t^2 d L of full attention, which PaLM's convention counts)
  + the frozen vision forward (2 x weights x tokens of the layers used, and its attention)
  + 6 x projector weights per image feature; as bench/train_bench.py's Flops, with 6 for 4 where
  weights train in full. Embeddings and norms are left out.
Per GPU: all ranks' real tokens (and FLOPs) over the slowest rank's step times, divided by the ranks.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_bench  # noqa: E402  (the mock cases, batch layout, FLOP counts and table of the 1-GPU bench)

from llavanext import model as modeling  # noqa: E402
from llavanext import speed  # noqa: E402
from llavanext.data.sources import MockDataset  # noqa: E402
from llavanext.strategies import shard_blocks  # noqa: E402

REPO = train_bench.REPO
PEAK_TFLOPS = train_bench.PEAK_TFLOPS
PARTS = OmegaConf.create({"vision_tower": "frozen", "projector": "full", "language_model": "full"})
NO_PEFT = OmegaConf.create({"method": "none"})

# the levers, added in this order (each row: the one before plus its lever); `ours` is the last row
# a case runs. Packing only for mixed (one sample a step has nothing to pack); compile on CUDA unless
# --compile off; checkpointing only with --ckpt-layers N
CHAIN = [
    ("baseline", None),
    ("+ vision tower to layer -2", "vision"),
    ("+ assistant-only fused CE", "fused"),
    ("+ packing, varlen attention", "pack"),
    ("+ compiled decoder layers", "compile"),
    ("+ checkpoint N layers", "ckpt"),
]
EXTRAS = [  # worst case, on top of ours
    ("  ours, reshard_after_forward=False", "keep"),
    ("  ours, checkpoint all layers (recipe)", "ckpt_all"),
]


def chain(case: str, compile: bool, ckpt_layers: int) -> list[tuple[str, set]]:
    """The rows of a case: (name, levers on)."""
    skip = {"pack"} if case == "worst" else set()  # one sample a step: nothing to pack
    skip |= (set() if compile else {"compile"}) | (set() if ckpt_layers else {"ckpt"})
    rows, on = [], set()
    for row, lever in CHAIN:
        if lever in skip:
            continue
        on = on | {lever} if lever else on
        rows.append((row.replace(" N ", f" {ckpt_layers} "), on))
    return rows


class FullFlops(train_bench.Flops):
    """Useful FLOPs of one full-finetune step on one rank (the convention in the module docstring)."""

    def __call__(self, meta) -> float:
        tokens = sum(meta["lengths"])
        lm = 6 * self.n_lm * tokens + 6 * self.vocab * self.d * meta["labelled"]
        attention = sum(6 * t * t * self.d * self.layers for t in meta["lengths"])
        s = self.vis_tokens
        vision = meta["tiles"] * self.vision_used * (2 * self.n_vis_layer * s + 4 * s * s * self.vis_d)
        projector = 6 * self.n_proj * meta["tiles"] * (s - 1)
        return float(lm + attention + vision + projector)


# --- distributed set-up ------------------------------------------------------------------------

class Dist:
    def __init__(self, device_arg: str, sync_timeout_s: float):
        cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        self.device = torch.device("cuda", local) if cuda else torch.device("cpu")
        dist.init_process_group("nccl" if cuda else "gloo")
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device.type, (self.world,))
        # results and failures travel on a CPU group with a short timeout: a rank stuck in a
        # collective (another rank failed inside a step) must not hold the others forever
        self.side = dist.new_group(backend="gloo", timeout=timedelta(seconds=sync_timeout_s))

    def gather(self, obj):
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.side)
        return out

    def collectives_ok(self) -> bool:
        """After a failed row: does the device group still answer in step (ones sum to the world)?"""
        try:
            t = torch.ones(1, device=self.device)
            dist.all_reduce(t, async_op=True).wait(timeout=timedelta(seconds=60))
            return int(t.item()) == self.world
        except Exception:
            return False


# --- model -------------------------------------------------------------------------------------

def snapshot_initial(model_cfg, d: Dist, seed: int) -> dict:
    """Initialise the whole model once (same seed on every rank), shard it, keep this rank's shards
    and the buffers on the CPU; every row starts from them."""
    from torch.distributed.tensor import DTensor

    torch.manual_seed(seed)
    hf = modeling.build_model(model_cfg, modeling.hf_config(model_cfg), device=d.device)
    # sharding assumes the same weights everywhere: check one number per rank
    probe = sum(float(p.detach().double().sum())
                for p in (hf.lm_head.weight, speed.decoder_layers(hf)[0].mlp.up_proj.weight))
    if len(set(d.gather(probe))) != 1:
        raise RuntimeError("ranks initialised different weights from the same seed")
    shard_blocks(hf, d.mesh, reshard_after_forward=True, bf16=False)
    state = {n: (t.to_local() if isinstance(t, DTensor) else t).detach().cpu().clone()
             for n, t in [*hf.named_parameters(), *hf.named_buffers()]}
    del hf
    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    return state


def build_row(model_cfg, state: dict, on: set, d: Dist, args):
    """A fresh sharded model with this row's levers, filled from the snapshot."""
    from torch.distributed.tensor import DTensor

    with torch.device("meta"):
        hf = modeling.build_model(model_cfg, modeling.hf_config(model_cfg))
    hf = modeling.apply_parts(hf, PARTS, NO_PEFT).train()
    if "vision" in on:
        speed.truncate_vision_tower(hf)
    if "pack" in on:
        speed.set_language_attention(hf, speed.PACKED_ATTENTION)
    layers = len(speed.decoder_layers(hf))
    ckpt = layers if "ckpt_all" in on else args.ckpt_layers if "ckpt" in on else 0
    if ckpt:
        speed.checkpoint_layers(hf, ckpt)
    shard_blocks(hf, d.mesh, reshard_after_forward=args.reshard_after_forward and "keep" not in on,
                 bf16=d.device.type == "cuda")
    hf.to_empty(device=d.device)
    with torch.no_grad():
        for name, t in [*hf.named_parameters(), *hf.named_buffers()]:
            (t.to_local() if isinstance(t, DTensor) else t).copy_(state[name])
    if "compile" in on:  # each block in place; dynamo leaves FSDP2's hooks out of the graphs (they run eagerly)
        speed.compile_decoder_layers(hf)
    return hf


# --- one row -----------------------------------------------------------------------------------

def loader(case, model_cfg, packed, micro_batch, steps, d: Dist, workers):
    data = OmegaConf.create({"num_samples": 10**6, "seed": 0, "image_sizes": case["image_sizes"],
                             "text_tokens": case["text_tokens"], "answer_fraction": 0.5})
    dataset = MockDataset(data, model_cfg, model_cfg.image_token_index, model_cfg.text.vocab_size)
    # as a distributed sampler: step s of rank r reads samples (s * world + r) * micro_batch + ...
    indices = [(s * d.world + d.rank) * micro_batch + j for s in range(steps) for j in range(micro_batch)]
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=micro_batch,
                                       shuffle=False, num_workers=workers, collate_fn=train_bench.Collate(packed),
                                       prefetch_factor=4 if workers else None)


def run_row(model_cfg, state, on, case, micro_batch, d: Dist, args) -> list[dict]:
    """Train args.steps steps of a fresh model; this rank's per-step records."""
    model = build_row(model_cfg, state, on, d, args)
    cuda = d.device.type == "cuda"
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, fused=cuda)
    batches = loader(case, model_cfg, "pack" in on, micro_batch, args.steps, d, args.workers)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rows = []
    fetch = time.perf_counter()
    for batch in batches:
        meta = batch.pop("meta")
        batch = {k: v.to(d.device, non_blocking=True) for k, v in batch.items()}
        if cuda:
            batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        begin = time.perf_counter()
        if not on:
            loss = model(**batch).loss  # the plain loop
        elif "fused" in on:  # as the CLI: a forward of the FSDP root (strategies.shard_blocks registers it)
            loss = speed.assistant_loss(model, batch)
        else:
            loss = model(**batch, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step
        end = time.perf_counter()
        rows.append({"loss": value, "time": end - begin, "wait": begin - fetch, **meta})
        fetch = end
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    return [dict(r, peak_gib=peak) for r in rows]


def summarise(per_rank: list[list[dict]], flops, warmup: int, world: int) -> dict:
    """One row of the table from every rank's records: per GPU, over the slowest rank's steps."""
    steps = len(per_rank[0])
    step = [max(r[s]["time"] for r in per_rank) for s in range(steps)]
    total = [max(r[s]["time"] + r[s]["wait"] for r in per_rank) for s in range(steps)]
    tokens = [sum(sum(r[s]["lengths"]) for r in per_rank) for s in range(steps)]
    timed = range(min(warmup, steps - 1), steps)
    seconds = sum(total[s] for s in timed)
    real = sum(tokens[s] for s in timed)
    cuda = per_rank[0][0]["peak_gib"] is not None
    return {
        "steps": steps, "timed": len(timed),
        "first_step_s": step[0],
        "step_ms_median": 1e3 * statistics.median(step[s] for s in timed),
        "tokens_per_s": real / seconds / world,
        "samples_per_s": sum(r[s]["samples"] for r in per_rank for s in timed) / seconds / world,
        "mfu": sum(flops(r[s]) for r in per_rank for s in timed) / seconds / world / (PEAK_TFLOPS * 1e12)
        if cuda else None,
        "padding": 1 - real / sum(r[s]["slots"] for r in per_rank for s in timed),
        "wait_ms": 1e3 * statistics.mean(max(r[s]["wait"] for r in per_rank) for s in timed),
        "peak_gib": max(r[0]["peak_gib"] for r in per_rank) if cuda else None,
        "losses": [statistics.mean(r[s]["loss"] for r in per_rank) for s in range(steps)],
        "per_step": [[total[s], tokens[s]] for s in range(steps)],  # for train_bench.table's ratio
    }


def quality(results, case, ours) -> str:
    base = next((r for r in results if r["case"] == case and r["row"] == "baseline" and "error" not in r), None)
    mine = next((r for r in results if r["case"] == case and r["row"] == ours and "error" not in r), None)
    if not base or not mine:
        return f"{case}: no loss comparison (a run is missing)"
    pairs = list(zip(base["losses"], mine["losses"]))
    diffs = [abs(a - b) for a, b in pairs]
    return (f"{case}: loss (mean over ranks), baseline vs ours ({mine['row'].strip()}), same weights and batches: "
            f"max |diff| {max(diffs):.4f} over {len(pairs)} steps; "
            + " ".join(f"{a:.4f}/{b:.4f}" for a, b in pairs))


def free(device: torch.device) -> None:
    gc.collect()  # FSDP2 state and modules refer to each other
    torch._dynamo.reset()  # compiled graphs of the row's layers
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="7b", help="conf/model/<name>.yaml")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--cases", default="worst,mixed")
    parser.add_argument("--steps", type=int, default=12, help="steps of every row")
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the timing")
    parser.add_argument("--micro-batch", type=int, default=0, help="samples a step per rank (0: the case's)")
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="the compile row (auto: on CUDA only)")
    parser.add_argument("--ckpt-layers", type=int, default=0,
                        help="ours checkpoints this many decoder layers (0: none, and no row for it)")
    parser.add_argument("--reshard-after-forward", action=argparse.BooleanOptionalAction, default=True,
                        help="every row's FSDP2 setting (the extra row tries False on ours)")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True,
                        help="worst case: ours without resharding after forward, ours checkpointing every layer")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=330, help="start no row after this many seconds")
    parser.add_argument("--sync-timeout-s", type=float, default=120,
                        help="how long ranks wait for each other after a row before giving up")
    parser.add_argument("--out", default="outputs/fsdp_bench")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    # fewer fragmentation OOMs as rows of different shapes follow each other (read at CUDA's start)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    d = Dist(args.device, args.sync_timeout_s)
    zero = d.rank == 0
    say = print if zero else (lambda *a, **k: None)
    out = Path(args.out)
    if zero:
        out.mkdir(parents=True, exist_ok=True)
    cuda = d.device.type == "cuda"
    name = torch.cuda.get_device_name(d.device) if cuda else "cpu"
    import transformers

    say(f"{d.world} x {name}; torch {torch.__version__}, transformers {transformers.__version__}", flush=True)

    model_cfg = OmegaConf.load(REPO / f"conf/model/{args.model}.yaml")
    model_cfg.dtype = "float32"  # master weights; FSDP2 computes in bf16 on CUDA
    model_cfg.attn_implementation = "sdpa"  # the packed rows switch the language model to sdpa_packed
    scale = model_cfg.vision.image_size / 336  # the tiny model's tiles are smaller: same tile counts
    cases = {k: {**v, "image_sizes": [[int(h * scale), int(w * scale)] for h, w in v["image_sizes"]]}
             for k, v in train_bench.CASES.items() if k in args.cases.split(",")}
    compile = args.compile == "on" or (args.compile == "auto" and cuda)

    state = snapshot_initial(model_cfg, d, args.seed)
    with torch.device("meta"):
        flops = FullFlops(modeling.build_model(model_cfg, modeling.hf_config(model_cfg)))
    say(f"model {args.model}: initialised and sharded in {time.perf_counter() - t0:.0f}s; "
        f"{sum(t.numel() for t in state.values()):,} weights on rank 0", flush=True)

    chains = {case: chain(case, compile, args.ckpt_layers) for case in cases}
    ours = {case: rows[-1] for case, rows in chains.items()}
    plan = []  # most wanted first: baseline and ours of each case, then one lever at a time, then extras
    for case in cases:
        plan += [(case, chains[case][0]), (case, ours[case])]
    for case in cases:
        plan += [(case, row) for row in chains[case][1:-1]]
    if args.extras and "worst" in cases:
        plan += [("worst", (row, ours["worst"][1] | {lever})) for row, lever in EXTRAS]

    results = []
    for case, (row, on) in plan:
        started = d.gather(time.perf_counter() - t0)[0]  # rank 0's clock decides for every rank
        if started > args.budget_s:
            results.append({"case": case, "row": row, "error": "skipped (time budget)"})
            continue
        micro = args.micro_batch or cases[case]["micro_batch"][0]
        try:
            mine = run_row(model_cfg, state, on, cases[case], micro, d, args)
        except Exception as e:  # reported, memory freed; the ranks decide below whether to go on
            if not train_bench.is_oom(e):
                traceback.print_exc()
            first = str(e).splitlines()[0][:100] if str(e) else ""
            mine = f"rank {d.rank}: {type(e).__name__}: {first}"
        free(d.device)
        try:
            every = d.gather(mine)
        except Exception:  # another rank is stuck in a collective of the failed step
            here = mine if isinstance(mine, str) else "ok on this rank"
            print(f"rank {d.rank}: ranks out of step after {case} / {row.strip()} ({here}); stopping", flush=True)
            if zero:
                results.append({"case": case, "row": row, "error": "ranks out of step: stopped here"})
                (out / "bench.json").write_text(json.dumps({"device": name, "world": d.world, "results": results}))
            os._exit(3)
        errors = [e for e in every if isinstance(e, str)]
        if errors:
            r = {"error": "; ".join(errors)[:200]}
        else:
            r = summarise(every, flops, args.warmup, d.world)
        r.update(case=case, row=row, levers=sorted(on), micro_batch=micro)
        results.append(r)
        if zero:
            if errors:
                print(f"{case:<6} {row:<40} failed: {r['error']}", flush=True)
            else:
                print(f"{case:<6} {row:<40} {r['tokens_per_s']:>9,.0f} tok/s/GPU  step {r['step_ms_median']:.0f} ms  "
                      f"MFU {train_bench.fmt(r['mfu'], '.1%')}  peak {train_bench.fmt(r['peak_gib'], '.1f')} GiB  "
                      f"first step {r['first_step_s']:.1f}s  [{time.perf_counter() - t0:.0f}s]", flush=True)
            (out / "bench.json").write_text(json.dumps({"device": name, "world": d.world, "results": results},
                                                       indent=1))
        if errors and not d.collectives_ok():
            say("the device group no longer answers in step after that failure: no more rows", flush=True)
            break

    order = {row: i for i, (row, _) in enumerate([r for c in cases for r in chains[c]] + EXTRAS)}
    results.sort(key=lambda r: (list(cases).index(r["case"]), order.get(r["row"], 99)))
    report = [quality(results, case, ours[case][0]) for case in cases]
    report += ["", f"{d.world} x {name}  model: {args.model}  full finetune, FSDP2  compile: {compile}  "
               f"checkpointed layers in ours: {args.ckpt_layers}  reshard_after_forward: {args.reshard_after_forward}",
               "(per GPU; tok/s: real tokens, no padding; MFU vs "
               f"{PEAK_TFLOPS:.0f} TFLOP/s; x base: tok/s over the baseline's on the same steps)",
               train_bench.table(results)]
    text = "\n".join(report)
    if zero:
        (out / "table.txt").write_text(text + "\n")
        print(text, flush=True)
    ok = bool(results) and all("error" not in r for r in results)
    dist.destroy_process_group()
    return ok


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
