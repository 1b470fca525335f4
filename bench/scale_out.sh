#!/usr/bin/env bash
# Scale-out speed run: LLaVA-NeXT-7B with random weights on mock data (3,329 tokens a sample: 400 text + one
# 672x672 image), full finetune with FSDP2 and LoRA with DDP, torchrun on this node. Results: docs/benchmarks.md.
# usage: bench/scale_out.sh [devices] [steps] [log folder] [more overrides...]   (MODEL=tiny for a CPU try)
set -uo pipefail
DEVICES=${1:-2}
STEPS=${2:-8}
LOGS=${3:-outputs/bench}
mkdir -p "$LOGS"
COMMON=("model=${MODEL:-7b}" data=mock executor=local "executor.devices=$DEVICES" data.micro_batch_size=1
        "trainer.max_steps=$STEPS" trainer.checkpoint_every=0 trainer.print_every=1 trainer.progress_bar=none
        trainer.precision=bf16-mixed optim.warmup_steps=2 "${@:4}")
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
# full finetune: float32 master weights, bf16 compute, activations recomputed per block
timeout "${RUN_TIMEOUT:-2h}" llavanext finetune "${COMMON[@]}" strategy=fsdp model.gradient_checkpointing=true model.dtype=float32 \
    hydra.run.dir="$LOGS/fsdp-full" 2>&1 | tee "$LOGS/fsdp-full.log" | grep -E '^step|GPU memory|Error|error'
# LoRA (r=16 on every linear layer of the language model) + projector: base weights in bf16
timeout "${RUN_TIMEOUT:-2h}" llavanext finetune "${COMMON[@]}" peft=lora strategy=ddp model.dtype=bfloat16 \
    hydra.run.dir="$LOGS/ddp-lora" 2>&1 | tee "$LOGS/ddp-lora.log" | grep -E '^step|GPU memory|Error|error'
# tokens/s per GPU: median over the steps after the second (rank 0's tokens over its step time)
python3 - "$LOGS" <<'PY'
import pathlib, re, statistics, sys
for run in ("fsdp-full", "ddp-lora"):
    path = pathlib.Path(sys.argv[1]) / f"{run}.log"
    steps = [line for line in path.read_text().splitlines() if line.startswith("step")] if path.exists() else []
    tok = [float(m.group(1).replace(",", "")) for line in steps[2:] if (m := re.search(r"([\d,]+) tok/s", line))]
    peak = max((float(m.group(1)) for line in steps if (m := re.search(r"peak ([\d.]+) GiB", line))), default=0.0)
    median = statistics.median(tok) if tok else 0.0
    print(f"{run:10s} tokens/s/GPU median {median:,.0f} over {len(tok)} steps, peak allocated {peak:.1f} GiB")
PY
