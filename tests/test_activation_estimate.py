"""The plan's per-layer memory (what `auto` checkpointing stands on) against what autograd really keeps.

Live on this CPU for the full-finetune cases (CPU and GPU autocast keep the same tensors there), and
against the H100 measurements of bench/activation_probe.py (tests/data/activation_probe_h100.json:
7b, 13b, mistral_7b; full and LoRA; torch 2.11, transformers 5.17, peft 0.21) for every case.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

from llavanext import plan as planning

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from activation_probe import config, saved_by_one_layer  # noqa: E402

# a 7B-shaped layer (intermediate / hidden as the 7B's) small enough for a CPU; 700 tokens so that no
# activation has a weight's shape
NARROW = ["model.text.hidden_size=512", "model.text.intermediate_size=1376", "model.text.num_attention_heads=8",
          "model.text.num_key_value_heads=8"]


@pytest.mark.parametrize("case", ["full, float32 weights", "full, bf16 weights (as FSDP2 gathers them)",
                                  "lora, bf16 base, dropout 0"])
def test_layer_estimate_matches_what_autograd_keeps_on_cpu(case):
    cfg = config("tiny", case, 700, NARROW)
    activations, copies = saved_by_one_layer(cfg, torch.device("cpu"))
    estimate, estimate_copies = planning.layer_bytes(cfg, 700)
    assert 0.95 <= (estimate + estimate_copies) / (activations + copies) <= 1.06, (estimate, activations)


def test_layer_estimate_covers_every_h100_measurement():
    rows = json.loads((REPO / "tests/data/activation_probe_h100.json").read_text())
    assert {r["model"] for r in rows} == {"7b", "13b", "mistral_7b"} and len(rows) == 18
    for row in rows:
        estimate, copies = planning.layer_bytes(config(row["model"], row["case"], 3000), 3000)
        # never below what was measured (auto must not pick too few layers), at most 6% above
        assert 1.0 <= estimate / row["measured"] <= 1.06, row
        assert row["copies"] * 0.95 <= copies <= row["copies"] * 1.15 or row["copies"] < 2**23, row
