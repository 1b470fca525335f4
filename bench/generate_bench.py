"""Generation speed: llavanext's decoder against plain `model.generate`, and against the bandwidth bound.

Builds a LLaVA-NeXT model from `conf/model/<model>.yaml` with random weights (bf16 on a GPU),
one prompt of a 2x2-tile image plus text (for 7b: a 672x672 image, 2,948 tokens), and measures
time to first token and decode tokens/s at batch 1, then the throughput of a batch of such
prompts. The bound is the weight bytes one decode step must read over the measured memory
bandwidth (a device-to-device copy, bytes read + written).

A decoder is `<mode>` or `<mode>_<variant>` (llavanext/decoding.py): mode eager, graph or compile;
variant hf (transformers' forward: the decoder before issue 5), fused (ours: fused q/k/v and gate/up
GEMVs, matmul attention over the static cache), unfused (fused, but separate q/k/v and gate/up projections); no variant is `auto`, what `llavanext generate` uses (fused on a GPU).
`--profile DIR` also writes the kernels of a few eager decode steps of hf and of fused.

    python bench/generate_bench.py --model 7b                     # on a GPU
    python bench/generate_bench.py --model tiny --modes eager,eager_fused --batch 2   # on a CPU: does it run
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from importlib import resources

import torch
from omegaconf import OmegaConf

from llavanext.data.encoder import image_token_count
from llavanext.data.images import make_image_processor
from llavanext.decoding import MODES, VARIANTS, Decoder, Sampling
from llavanext.model import hf_config


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(name: str, device, dtype):
    model_cfg = OmegaConf.load(resources.files("llavanext.conf") / "model" / f"{name}.yaml")
    config = hf_config(model_cfg)
    config._attn_implementation = "sdpa"
    from transformers import LlavaNextForConditionalGeneration

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    with torch.device(device):  # initialise on the device: a 7B model on a CPU takes minutes
        model = LlavaNextForConditionalGeneration(config)
    torch.set_default_dtype(default)
    model.eval()
    model.generation_config.eos_token_id = None  # run every row to max_new_tokens
    model.generation_config.pad_token_id = 0
    return model_cfg, model


def prompt(model_cfg, device, dtype, batch: int, total: int = 2948):
    """`batch` copies of: <s>, text, one 2x2-tile image's tokens, text (`total` tokens in all for 7b)."""
    from PIL import Image

    side = 2 * model_cfg.vision.image_size
    images = image_token_count(side, side, model_cfg)
    text = max(total - images - 1, 8)
    g = torch.Generator().manual_seed(0)
    words = torch.randint(100, model_cfg.text.vocab_size - 100, (text,), generator=g).tolist()
    ids = [1] + words[: text // 4] + [model_cfg.image_token_index] * images + words[text // 4:]
    pixels = torch.randint(0, 255, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    pixel_values = make_image_processor(model_cfg)([Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
    input_ids = torch.tensor([ids] * batch, device=device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values.repeat(batch, 1, 1, 1, 1).to(device, dtype),
            "image_sizes": torch.tensor([[side, side]] * batch, device=device)}


def bandwidth(device) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy, read + written."""
    if device.type != "cuda":
        return None
    x = torch.randn(2**29, device=device, dtype=torch.bfloat16)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        y.copy_(x)
    end.record()
    torch.cuda.synchronize()
    return 2 * x.numel() * x.element_size() * 20 / (start.elapsed_time(end) / 1e3)


def decode_bytes(model) -> int:
    """Weights one decode step reads: the language model's layers, final norm and lm_head
    (the embedding table is left out: a step reads one row of it)."""
    lm = model.model.language_model
    embed = lm.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in lm.parameters()) - embed.numel() * embed.element_size()
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def time_plain(model, batch, new, device):
    """Seconds for `model.generate` to give `new` tokens (greedy, default dynamic cache), and its tokens."""
    sync(device)
    start = time.perf_counter()
    out = model.generate(**batch, max_new_tokens=new, do_sample=False)
    sync(device)
    return time.perf_counter() - start, out[:, batch["input_ids"].shape[1]:].tolist()


def time_ours(decoder, batch, new, device):
    """(time to first token, seconds from first to last token, tokens of row 0)."""
    sync(device)
    start = time.perf_counter()
    stream = decoder.stream(batch, Sampling(max_new_tokens=new))
    tokens = [next(stream)]
    first = time.perf_counter()
    tokens += list(stream)
    sync(device)
    return first - start, time.perf_counter() - first, [t[0] for t in tokens]


def decoder_name(name: str) -> tuple[str, str]:
    """`graph` -> (graph, auto), `graph_hf` -> (graph, hf)."""
    mode, _, variant = name.partition("_")
    if mode not in MODES or (variant or "auto") not in VARIANTS:
        raise SystemExit(f"unknown decoder {name!r}: <mode>[_<variant>], mode in {MODES}, variant in {VARIANTS}")
    return mode, variant or "auto"


def same_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def measure(args, model, batch, rows, new, device, plain_tokens, out, began):
    """Rows of the table for one batch size: plain generate, then each of our decode modes."""
    modes = args.modes if rows == 1 else args.batch_modes
    result = {}
    if args.plain:
        time_plain(model, batch, 2, device)  # warm-up
        ttft = min(time_plain(model, batch, 1, device)[0] for _ in range(2))
        total, tokens = time_plain(model, batch, new, device)
        plain_tokens[rows] = tokens[0]
        result["plain generate"] = {"ttft_s": ttft, "decode_tok_s": rows * (new - 1) / (total - ttft),
                                    "total_tok_s": rows * new / total, "setup_s": 0.0, "same": new}
    for mode in modes:
        if mode.startswith("compile") and time.perf_counter() - began > args.deadline:
            result[f"ours {mode}"] = {"error": f"skipped: past --deadline {args.deadline}s"}
            continue
        decoder = None
        try:
            start = time.perf_counter()
            decoder = Decoder(model, *decoder_name(mode))
            time_ours(decoder, batch, new, device)  # warm-up: captures or compiles the step
            setup = time.perf_counter() - start
            runs = [time_ours(decoder, batch, new, device) for _ in range(args.repeats)]
            ttft = statistics.median(r[0] for r in runs)
            decode = statistics.median(r[1] for r in runs)
            result[f"ours {mode}"] = {"ttft_s": ttft, "decode_tok_s": rows * (new - 1) / decode,
                                      "total_tok_s": rows * new / (ttft + decode), "setup_s": setup,
                                      "same": same_prefix(runs[0][2], plain_tokens.get(rows, [])),
                                      "variant": decoder.variant}
        except Exception as e:  # one mode failing must not lose the others' numbers
            result[f"ours {mode}"] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        finally:
            decoder = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        print(json.dumps({"batch": rows, mode: result[f"ours {mode}"]}), flush=True)
    out[rows] = result


def kernel_table(prof, steps: int, rows: int = 25) -> tuple[str, dict]:
    """The GPU kernels of a profile, summed by name, per step: the top `rows` by time, and totals."""
    kernels = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            calls, us = kernels.get(e.name, (0, 0.0))
            kernels[e.name] = (calls + 1, us + e.time_range.elapsed_us())
    busy = sum(us for _, us in kernels.values()) / steps
    launches = sum(calls for calls, _ in kernels.values()) / steps
    lines = [f"GPU busy {busy:.0f} us per step in {launches:.0f} kernels", "",
             "| us/step | % | calls/step | kernel |", "|---|---|---|---|"]
    for name, (calls, us) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:rows]:
        lines.append(f"| {us / steps:.1f} | {100 * us / steps / busy:.1f} | {calls / steps:g} | {name[:150]} |")
    return "\n".join(lines), {"gpu_busy_us": busy, "kernels": launches}


def profile(args, model, batch, device, folder: str) -> dict:
    """torch.profiler over a few eager decode steps of transformers' forward (hf) and of ours
    (fused): the kernel table and the op table of each, written to `folder`."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    os.makedirs(folder, exist_ok=True)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    rows, prompt_len = batch["input_ids"].shape
    steps, summary = 5, {}
    for variant in ("hf", "fused"):
        decoder = Decoder(model, "eager", variant)
        list(decoder.stream(batch, Sampling(max_new_tokens=3)))  # warm-up: cuBLAS heuristics, the allocator
        slot = decoder.slot(rows, prompt_len + args.new_tokens)  # the bench's cache length; its contents don't matter
        slot.step.fill_(prompt_len)
        for _ in range(2):
            decoder.run_step(slot)
        sync(device)
        start = time.perf_counter()
        with torch_profile(activities=activities) as prof:
            for _ in range(steps):
                decoder.run_step(slot)
            sync(device)
        wall = (time.perf_counter() - start) / steps
        name = f"eager_{variant}"
        sort = ("self_device_time_total" if hasattr(prof.key_averages()[0], "self_device_time_total")
                else "self_cuda_time_total") if cuda else "self_cpu_time_total"
        ops = prof.key_averages().table(sort_by=sort, row_limit=25)
        kernels, totals = kernel_table(prof, steps) if cuda else ("(no GPU)", {})
        summary[name] = {"wall_us_profiled": 1e6 * wall, **totals}
        with open(os.path.join(folder, f"{name}.txt"), "w") as f:
            f.write(f"{steps} eager decode steps, batch {rows}, cache {slot.slots.numel()} slots, "
                    f"{1e6 * wall:.0f} us per step under the profiler\n\n## kernels\n\n{kernels}\n\n"
                    f"## ops (sorted by {sort})\n\n{ops}\n")
        print(json.dumps({"profile": name, **summary[name]}), flush=True)
        del decoder, slot
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return summary


def table(out, bound, new, batch_new) -> str:
    lines = ["| batch | decoder | time to first token | decode tok/s | × plain | % of bound | total tok/s | "
             "setup s | greedy tokens = plain |",
             "|---|---|---|---|---|---|---|---|---|"]
    for rows, result in out.items():
        plain = result.get("plain generate", {}).get("decode_tok_s")
        n = new if rows == 1 else batch_new
        for name, r in result.items():
            if "error" in r:
                lines.append(f"| {rows} | {name} | {r['error']} | | | | | | |")
                continue
            ratio = f"{r['decode_tok_s'] / plain:.2f}×" if plain else ""
            share = f"{100 * r['decode_tok_s'] / rows / bound:.0f}%" if bound and rows == 1 else ""
            if r.get("variant") and not name.endswith(r["variant"]):
                name = f"{name} ({r['variant']})"  # what `auto` chose
            lines.append(f"| {rows} | {name} | {1e3 * r['ttft_s']:.0f} ms | {r['decode_tok_s']:.1f} | {ratio} | "
                         f"{share} | {r['total_tok_s']:.1f} | {r['setup_s']:.1f} | {r['same']}/{n} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="7b", help="conf/model/<name>.yaml")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto", help="auto: bfloat16 on a GPU, float32 on a CPU")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per row at batch 1")
    parser.add_argument("--batch", type=int, default=16, help="rows of the throughput run (0: skip it)")
    parser.add_argument("--batch-new-tokens", type=int, default=32)
    parser.add_argument("--modes", default="eager_hf,eager,graph_hf,graph,graph_unfused,compile_hf,compile",
                        help="our decoders at batch 1: <mode>[_<variant>] (see above)")
    parser.add_argument("--batch-modes", default="graph_hf,graph,compile", help="our decoders at --batch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-plain", dest="plain", action="store_false", help="skip transformers' generate")
    parser.add_argument("--deadline", type=float, default=1e9, help="start no compile after this many seconds")
    parser.add_argument("--json", help="write the numbers here too")
    parser.add_argument("--profile", metavar="DIR", help="write kernel tables of eager decode steps (hf, fused) here")
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    args.batch_modes = [m for m in args.batch_modes.split(",") if m]
    for name in args.modes + args.batch_modes:
        decoder_name(name)
    began = time.perf_counter()

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "float32": torch.float32,
             "bfloat16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    model_cfg, model = build(args.model, device, dtype)
    weights = decode_bytes(model)
    bw = bandwidth(device)
    bound = bw / weights if bw else None
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    header = (f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, model={args.model} "
              f"({dtype}), decode reads {weights / 1e9:.2f} GB of weights a step"
              + (f"; copy bandwidth {bw / 1e12:.2f} TB/s, bound {bound:.0f} tok/s at batch 1" if bw else ""))
    print(header, flush=True)

    out, plain_tokens = {}, {}
    with torch.no_grad():
        single = prompt(model_cfg, device, dtype, 1)
        print(f"prompt: {single['input_ids'].shape[1]} tokens, pixel_values {tuple(single['pixel_values'].shape)}",
              flush=True)
        measure(args, model, single, 1, args.new_tokens, device, plain_tokens, out, began)
        profiled = profile(args, model, single, device, args.profile) if args.profile else None
        del single
        if args.batch:
            many = prompt(model_cfg, device, dtype, args.batch)
            measure(args, model, many, args.batch, args.batch_new_tokens, device, plain_tokens, out, began)
    text = table(out, bound, args.new_tokens, args.batch_new_tokens)
    print(f"\n{header}\n\n{text}\n\n(total {time.perf_counter() - began:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "bound_tok_s": bound, "results": out, "profile": profiled}, f, indent=2)


if __name__ == "__main__":
    main()
