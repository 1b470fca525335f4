"""Training speed: the plain transformers + peft loop against llavanext's levers, one process, one GPU.

    make bench                                              # LLaVA-NeXT-7B, random weights, bf16, the GPU
    python bench/train_bench.py --model tiny --device cpu   # smoke run of every path

Both sides train the same model (LoRA r=16 on the language model's linear layers, projector in
full, vision tower frozen) from the same weights on the same batches with fused AdamW:
  baseline  LlavaNextForConditionalGeneration(**batch).loss, SDPA, padded batches, bf16 weights,
            peft as it comes (fp32 adapters, inputs cast to fp32)
  ours      the levers of llavanext/speed.py, added one at a time (the table's rows, in order)
MFU convention (per step, useful work only; peak 989 TFLOP/s bf16 dense, H100/H200):
  4 N per real token (LoRA: forward + input gradients; N = the decoder layers' linear weights)
  + 4 V d per labelled token (LM head) + 6 t^2 d L per sample of length t (causal attention,
  forward + backward) + the frozen vision forward (2 x weights x tokens of the layers used, and
  its attention) + 6 x projector weights per image feature. LoRA adapters' own FLOPs are left out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parents[1]
PEAK_TFLOPS = 989.0  # H100/H200 SXM, dense bf16

from llavanext import model as modeling  # noqa: E402
from llavanext import speed  # noqa: E402
from llavanext.data.encoder import IGNORE, collate, pack  # noqa: E402
from llavanext.data.sources import MockDataset  # noqa: E402

# 336 px tiles (7B): pinpoints give 3 (336x672), 4 (1008x336) or 5 (672x672) tiles with the base image
CASES = {
    "worst": {"image_sizes": [[672, 672]], "text_tokens": [400, 400], "micro_batch": [1]},
    "mixed": {"image_sizes": [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
              "text_tokens": [50, 1000], "micro_batch": [2, 1]},  # 2 samples a step, or 1 if 2 padded OOM
}
# the levers, added in this order; `ours` is the last row of a case
CHAIN = [
    ("baseline", set()),
    ("+ vision tower to layer -2", {"vision"}),
    ("+ assistant-only fused CE", {"vision", "fused"}),
    ("+ LoRA under autocast", {"vision", "fused", "autocast"}),
    ("+ packing, varlen attention", {"vision", "fused", "autocast", "pack"}),
    ("+ compiled decoder layers", {"vision", "fused", "autocast", "pack", "compile"}),
]
OURS = CHAIN[-1][1]
EAGER = CHAIN[-2][1]  # extras build on ours without compile: each would cost a recompile
EXTRAS = [  # (case, row, levers): not in ours; "(no compile)" rows compare with the row before compile
    ("worst", "  (no compile) LoRA dropout 0, recipe 0.05", EAGER | {"dropout0"}),
    ("worst", "  (no compile) checkpoint 16 of 32 layers", EAGER | {"ckpt_half"}),
    ("worst", "  (no compile) checkpoint every layer", EAGER | {"ckpt_all"}),
    ("mixed", "  (no compile) packing, per-sample SDPA", EAGER | {"per_sample"}),
    # the loss comparison without dropout on either side: what is left is bf16 rounding
    ("worst", "baseline, LoRA dropout 0", {"dropout0"}),
    ("worst", "ours, LoRA dropout 0", OURS | {"dropout0"}),
    # the noise floor: the baseline against itself (nondeterministic kernels, new dropout masks)
    ("worst", "baseline again", {"again"}),
    # how much of ours' difference the bf16 LoRA products alone make (no packing, no compile)
    ("worst", "LoRA under autocast only, dropout 0", {"autocast", "dropout0"}),
    ("worst", "baseline again, LoRA dropout 0", {"again", "dropout0"}),  # no dropout: kernels' noise alone
]
QUALITY = [("baseline", CHAIN[-1][0]), ("baseline, LoRA dropout 0", "ours, LoRA dropout 0"),
           ("baseline", "baseline again"), ("baseline, LoRA dropout 0", "LoRA under autocast only, dropout 0"),
           ("baseline, LoRA dropout 0", "baseline again, LoRA dropout 0")]
FLASH_VARLEN = speed.FLASH_VARLEN


class Collate:
    """Padded (baseline) or packed batch, plus the numbers the table needs."""

    def __init__(self, packed: bool, pad_id: int = 0):
        self.packed, self.pad_id = packed, pad_id

    def __call__(self, samples):
        batch = (pack(samples, self.pad_id, sum(len(s.input_ids) for s in samples)) if self.packed
                 else collate(samples, self.pad_id))
        tiles = [pv.shape[0] for s in samples for pv in s.pixel_values]
        batch["meta"] = {
            "samples": len(samples),
            "lengths": [len(s.input_ids) for s in samples],
            "labelled": sum(int((s.labels[1:] != IGNORE).sum()) for s in samples),
            "slots": batch["input_ids"].numel(),
            "tiles": sum(tiles),
        }
        return batch


class Flops:
    """Useful FLOPs of one LoRA step (the convention in the module docstring)."""

    def __init__(self, model):
        hf = speed.unwrap(model)
        cfg = hf.config
        self.d, self.layers, self.vocab = cfg.text_config.hidden_size, cfg.text_config.num_hidden_layers, \
            cfg.text_config.vocab_size
        self.n_lm = sum(p.numel() for n, p in hf.model.language_model.layers.named_parameters()
                        if p.ndim == 2 and "lora_" not in n)
        vision = speed.vision_layers(hf.model.vision_tower)
        self.vision_used = speed.vision_depth(len(vision), cfg.vision_feature_layer)
        self.n_vis_layer = sum(p.numel() for p in vision[0].parameters() if p.ndim == 2)
        self.vis_d = cfg.vision_config.hidden_size
        self.vis_tokens = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2 + 1
        self.n_proj = sum(p.numel() for p in hf.model.multi_modal_projector.parameters() if p.ndim == 2)

    def __call__(self, meta) -> float:
        tokens = sum(meta["lengths"])
        lm = 4 * self.n_lm * tokens + 4 * self.vocab * self.d * meta["labelled"]
        attention = sum(6 * t * t * self.d * self.layers for t in meta["lengths"])
        s = self.vis_tokens
        vision = meta["tiles"] * self.vision_used * (2 * self.n_vis_layer * s + 4 * s * s * self.vis_d)
        projector = 6 * self.n_proj * meta["tiles"] * (s - 1)
        return float(lm + attention + vision + projector)


class Levers:
    """Switch the levers of one row on the shared model (and back off)."""

    def __init__(self, model, compile: bool):
        self.model, self.compile = model, compile
        self.dropouts = {}
        for name, module in model.named_modules():
            if hasattr(module, "lora_dropout"):
                self.dropouts[name] = dict(module.lora_dropout.items())

    def set(self, on: set):
        model = self.model
        speed.untruncate_vision_tower(model)
        if "vision" in on:
            speed.truncate_vision_tower(model)
        speed.lora_autocast(model, "autocast" in on)
        speed.set_language_attention(model, speed.PACKED_ATTENTION if "pack" in on else "sdpa")
        speed.FLASH_VARLEN = None if "per_sample" in on else FLASH_VARLEN
        for name, module in model.named_modules():
            if name in self.dropouts:
                for key, drop in self.dropouts[name].items():
                    module.lora_dropout[key] = torch.nn.Identity() if "dropout0" in on else drop
        layers = len(speed.decoder_layers(model))
        speed.checkpoint_layers(model, layers if "ckpt_all" in on else layers // 2 if "ckpt_half" in on else 0)
        speed.compile_decoder_layers(model, "compile" in on and self.compile)


def step_fn(model, on: set, device: torch.device):
    def step(batch):
        if not on - {"again"}:
            return model(**batch).loss  # the plain loop
        autocast = torch.autocast(device.type, dtype=torch.bfloat16) if "autocast" in on \
            else contextlib.nullcontext()
        with autocast:
            if "fused" in on:
                return speed.assistant_loss(model, batch)
            return model(**batch, use_cache=False).loss
    return step


def loader(case, model_cfg, packed, micro_batch, steps, workers):
    data = OmegaConf.create({"num_samples": 10**6, "seed": 0, "image_sizes": case["image_sizes"],
                             "text_tokens": case["text_tokens"], "answer_fraction": 0.5})
    dataset = MockDataset(data, model_cfg, model_cfg.image_token_index, model_cfg.text.vocab_size)
    indices = range(steps * micro_batch)  # same samples, same order, for every row
    return torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=micro_batch,
                                       shuffle=False, num_workers=workers, collate_fn=Collate(packed),
                                       prefetch_factor=4 if workers else None)


def run_row(model, levers, snapshot, on, case, args, device, flops, steps, micro_batch):
    """Train `steps` steps from the snapshot; time the ones after warm-up."""
    with torch.no_grad():
        for p, saved in snapshot:
            p.copy_(saved)
    levers.set(on)
    params = [p for p, _ in snapshot]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                                  fused=device.type == "cuda")
    step = step_fn(model, on, device)
    batches = loader(case, args.model_cfg, "pack" in on, micro_batch, steps, args.workers)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    rows = []
    started = time.perf_counter()
    fetch = time.perf_counter()
    for batch in batches:
        meta = batch.pop("meta")
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(args.dtype)
        begin = time.perf_counter()
        loss = step(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the step
        end = time.perf_counter()
        rows.append({"loss": value, "time": end - begin, "wait": begin - fetch, **meta})
        fetch = end
    timed = rows[args.warmup:] or rows
    total = sum(r["time"] + r["wait"] for r in timed)
    tokens = sum(sum(r["lengths"]) for r in timed)
    result = {
        "steps": len(rows), "timed": len(timed), "micro_batch": micro_batch,
        "first_step_s": rows[0]["time"], "wall_s": time.perf_counter() - started,
        "step_ms_median": 1e3 * statistics.median(r["time"] for r in timed),
        "tokens_per_s": tokens / total, "samples_per_s": sum(r["samples"] for r in timed) / total,
        "mfu": sum(flops(r) for r in timed) / total / (PEAK_TFLOPS * 1e12) if device.type == "cuda" else None,
        "padding": 1 - tokens / sum(r["slots"] for r in timed),
        "wait_ms": 1e3 * statistics.mean(r["wait"] for r in timed),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        "losses": [r["loss"] for r in rows],
        "per_step": [[r["time"] + r["wait"], sum(r["lengths"])] for r in rows],  # for same-window ratios
    }
    return result


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error)


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def table(results) -> str:
    head = f"{'case':<6} {'row':<38} {'tok/s':>9} {'samp/s':>7} {'step ms':>8} {'MFU':>6} {'peak GiB':>8} " \
           f"{'pad':>5} {'wait ms':>7} {'x base':>6}"
    lines = [head, "-" * len(head)]
    base = {r["case"]: r for r in results if r["row"] == "baseline" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"{r['case']:<6} {r['row']:<38} {r['error']}")
            continue
        ratio = None
        if r["case"] in base:  # over the same steps (same batches) as this row timed
            window = slice(r["steps"] - r["timed"], r["steps"])
            mine, theirs = r["per_step"][window], base[r["case"]]["per_step"][window]
            if len(theirs) == len(mine):
                ratio = (sum(n for _, n in mine) / sum(t for t, _ in mine)) / \
                    (sum(n for _, n in theirs) / sum(t for t, _ in theirs))
        lines.append(f"{r['case']:<6} {r['row']:<38} {r['tokens_per_s']:>9,.0f} {r['samples_per_s']:>7.2f} "
                     f"{r['step_ms_median']:>8.1f} {fmt(r['mfu'], '.1%'):>6} {fmt(r['peak_gib'], '.1f'):>8} "
                     f"{r['padding']:>5.1%} {r['wait_ms']:>7.2f} {fmt(ratio, '.2f'):>5}x")
    return "\n".join(lines)


def quality(results, case, base_row, ours_row) -> str | None:
    base = next((r for r in results if r["case"] == case and r["row"] == base_row and "error" not in r), None)
    ours = next((r for r in results if r["case"] == case and r["row"] == ours_row and "error" not in r), None)
    if not base or not ours:
        return None
    pairs = list(zip(base["losses"], ours["losses"]))
    diffs = [b - a for a, b in pairs]
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    lines = [f"{case}: loss, {base_row!r} vs {ours_row!r}, same weights and batches ({len(pairs)} steps); "
             f"difference mean {statistics.mean(diffs):+.4f} sd {sd:.4f}; "
             f"max |diff| {max(map(abs, diffs)):.4f}, "
             f"first {pairs[0][0]:.4f}/{pairs[0][1]:.4f}, last {pairs[-1][0]:.4f}/{pairs[-1][1]:.4f}"]
    lines += [f"  step {i:>3}  {a:.4f}  {b:.4f}  {b - a:+.4f}" for i, (a, b) in enumerate(pairs)]
    return "\n".join(lines)


def profile_step(model, levers, snapshot, on, case, args, device, out: Path, label: str):
    """One step under the profiler (after two warm ones): the top kernels, to say where time goes."""
    from torch.profiler import ProfilerActivity, profile

    levers.set(on)
    params = [p for p, _ in snapshot]
    optimizer = torch.optim.AdamW(params, lr=args.lr, fused=device.type == "cuda")
    step = step_fn(model, on, device)
    batches = list(loader(case, args.model_cfg, "pack" in on, 1, 3, 0))
    for i, batch in enumerate(batches):
        batch.pop("meta")
        batch = {k: v.to(device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(args.dtype)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        ctx = profile(activities=activities) if i == 2 else contextlib.nullcontext()
        with ctx as prof:
            loss = step(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(out / "profile.txt", "a") as f:
        f.write(f"\n===== {case} {label} =====\n")
        f.write(prof.key_averages().table(sort_by=sort, row_limit=30))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="7b", help="conf/model/<name>.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cases", default="worst,mixed")
    parser.add_argument("--quality-steps", type=int, default=50, help="steps of baseline and ours (losses compared)")
    parser.add_argument("--steps", type=int, default=8, help="steps of each other row")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out of the timing")
    parser.add_argument("--extras", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                        help="the compile row compiles (auto: on CUDA only)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--rows", default="", help="only these rows, names separated by '|' (default: all)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="start no row after this many seconds")
    parser.add_argument("--out", default="outputs/bench")
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    args.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").unlink(missing_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    import peft
    import transformers

    print(f"device {name}; torch {torch.__version__}, transformers {transformers.__version__}, "
          f"peft {peft.__version__}", flush=True)

    model_cfg = OmegaConf.load(REPO / f"conf/model/{args.model}.yaml")
    model_cfg.dtype = "bfloat16" if args.dtype == torch.bfloat16 else "float32"
    args.model_cfg = model_cfg
    scale = model_cfg.vision.image_size / 336  # the tiny model's tiles are smaller: same tile counts
    cases = {k: {**v, "image_sizes": [[int(h * scale), int(w * scale)] for h, w in v["image_sizes"]]}
             for k, v in CASES.items() if k in args.cases.split(",")}

    torch.manual_seed(0)
    model = modeling.build_model(model_cfg, modeling.hf_config(model_cfg), device=device).train()
    peft_cfg = OmegaConf.load(REPO / "conf/peft/lora.yaml").peft
    parts = OmegaConf.create({"vision_tower": "frozen", "projector": "full", "language_model": "lora"})
    model = modeling.apply_parts(model, parts, peft_cfg)
    modeling.check_trainable(modeling.part_table(model, parts))
    snapshot = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad]
    compile = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    levers = Levers(model, compile)
    flops = Flops(model)
    print(f"model {args.model}: built in {time.perf_counter() - t0:.0f}s; "
          f"{sum(p.numel() for p, _ in snapshot):,} trainable; LoRA r={peft_cfg.r} dropout={peft_cfg.dropout}",
          flush=True)

    plan = []  # (priority order) baseline and ours of each case first, then one lever at a time
    for case in cases:
        plan += [(case, CHAIN[0]), (case, CHAIN[-1])]
    quality_extras = [(case, row, on) for case, row, on in EXTRAS if any(row in pair for pair in QUALITY)]
    plan += [(case, (row, on)) for case, row, on in quality_extras if case in cases]
    for case in cases:
        plan += [(case, row) for row in CHAIN[1:-1] if not (case == "worst" and "pack" in row[1])]
    if args.extras:
        plan += [(case, (row, on)) for case, row, on in EXTRAS if case in cases and (case, row, on) not in quality_extras]
    if args.rows:
        plan = [(case, row) for case, row in plan if row[0] in args.rows.split("|")]
    micro = {case: spec["micro_batch"][0] for case, spec in cases.items()}
    results = []
    for case, (row, on) in plan:
        if time.perf_counter() - t0 > args.budget_s:
            results.append({"case": case, "row": row, "error": "skipped (time budget)"})
            continue
        quality_row = any(row in pair for pair in QUALITY)
        steps = args.quality_steps if quality_row else args.steps
        while True:
            try:
                r = run_row(model, levers, snapshot, on, cases[case], args, device, flops, steps, micro[case])
                break
            except Exception as e:  # one row failing must not lose the others
                if is_oom(e) and row == "baseline" and micro[case] in cases[case]["micro_batch"][:-1]:
                    smaller = cases[case]["micro_batch"][cases[case]["micro_batch"].index(micro[case]) + 1]
                    print(f"{case} baseline: out of memory at micro batch {micro[case]}, using {smaller}",
                          flush=True)
                    micro[case] = smaller
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    continue
                traceback.print_exc()
                r = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"}
                model.zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                break
        r.update(case=case, row=row, levers=sorted(on))
        results.append(r)
        if "error" not in r:
            print(f"{case:<6} {row:<38} {r['tokens_per_s']:>9,.0f} tok/s  step {r['step_ms_median']:.0f} ms  "
                  f"MFU {fmt(r['mfu'], '.1%')}  peak {fmt(r['peak_gib'], '.1f')} GiB  "
                  f"first step {r['first_step_s']:.1f}s  mb {r['micro_batch']}  "
                  f"[{time.perf_counter() - t0:.0f}s]", flush=True)
        (out / "bench.json").write_text(json.dumps({"device": name, "results": results}, indent=1))

    if args.profile and "worst" in cases and time.perf_counter() - t0 < args.budget_s:
        for label, on in (("baseline", CHAIN[0][1]), ("ours", OURS)):
            try:
                profile_step(model, levers, snapshot, on, cases["worst"], args, device, out, label)
            except Exception:
                traceback.print_exc()

    order = {row: i for i, row in enumerate([row for row, _ in CHAIN] + [row for _, row, _ in EXTRAS])}
    results.sort(key=lambda r: (list(cases).index(r["case"]), order[r["row"]]))
    report = [q for case in cases for pair in QUALITY if (q := quality(results, case, *pair))]
    report += ["", f"device: {name}  model: {args.model}  compile: {compile}  (tok/s: real tokens, no padding; "
               f"MFU vs {PEAK_TFLOPS:.0f} TFLOP/s; x base: tok/s over the baseline's on the same steps)", table(results)]
    text = "\n".join(report)
    (out / "table.txt").write_text(text + "\n")
    print(text, flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
