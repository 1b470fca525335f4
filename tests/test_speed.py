"""The speed levers compute what they replace: each against transformers' own path, tiny model, CPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llavanext import model as modeling
from llavanext import speed
from llavanext.data.encoder import IGNORE, collate
from llavanext.data.sources import MockDataset

REPO = Path(__file__).resolve().parents[1]


def tiny_cfg(**overrides):
    cfg = OmegaConf.load(REPO / "conf/model/tiny.yaml")
    cfg.attn_implementation = "sdpa"
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def tiny_model(cfg=None, seed=0):
    cfg = cfg or tiny_cfg()
    torch.manual_seed(seed)
    return modeling.build_model(cfg, modeling.hf_config(cfg)).train()


def samples(cfg, n=2, text=(20, 60)):
    data = OmegaConf.create({"num_samples": 100, "seed": 3, "image_sizes": [[56, 112], [112, 112], [168, 56]],
                             "text_tokens": list(text), "answer_fraction": 0.5})
    return [MockDataset(data, cfg, cfg.image_token_index, cfg.text.vocab_size)[i] for i in range(n)]


def packed(batch_samples):
    """Samples back to back in one row, positions restarting per sample (the data issue's layout)."""
    ids = torch.cat([s.input_ids for s in batch_samples])[None]
    labels = torch.cat([s.labels for s in batch_samples])[None]
    position_ids = torch.cat([torch.arange(len(s.input_ids)) for s in batch_samples])[None]
    out = collate(batch_samples, pad_id=0)
    return {"input_ids": ids, "labels": labels, "position_ids": position_ids,
            "pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


def lora(model, cfg, dropout=0.0):
    peft_cfg = OmegaConf.create({"method": "lora", "r": 4, "alpha": 8, "dropout": dropout,
                                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                    "up_proj", "down_proj"]})
    parts = OmegaConf.create({"vision_tower": "frozen", "projector": "full", "language_model": "lora"})
    model = modeling.apply_parts(model, parts, peft_cfg)
    for name, p in model.named_parameters():  # LoRA B starts at zero: make the adapters matter
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def image_features(model, batch):
    hf = speed.unwrap(model)
    with torch.no_grad():
        out = hf.model.get_image_features(batch["pixel_values"], batch["image_sizes"],
                                          vision_feature_layer=hf.config.vision_feature_layer,
                                          vision_feature_select_strategy=hf.config.vision_feature_select_strategy)
    return torch.cat(out.pooler_output)


def test_vision_depth():
    assert speed.vision_depth(24, -2) == 23
    assert speed.vision_depth(24, -1) == 24
    assert speed.vision_depth(24, [3, -5]) == 20
    assert speed.vision_depth(24, 0) == 0


def test_truncated_vision_tower_gives_the_same_features_and_keeps_its_weights():
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    batch = collate(samples(cfg), pad_id=0)
    full = image_features(model, batch)
    keys = list(model.state_dict())
    assert speed.truncate_vision_tower(model) == 1  # 3 layers, feature layer -2
    last = speed.vision_layers(model.model.vision_tower)[-1]
    calls = []
    last.self_attn.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():  # poison the skipped layer: it must not run
        for p in last.parameters():
            p.fill_(float("nan"))
    truncated = image_features(model, batch)
    assert torch.equal(full, truncated) and not calls
    assert list(model.state_dict()) == keys
    speed.untruncate_vision_tower(model)
    image_features(model, batch)
    assert calls  # the layer runs again


def test_frozen_vision_tower_records_no_graph():
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    speed.truncate_vision_tower(model)
    pixels = collate(samples(cfg), pad_id=0)["pixel_values"][:, 0].requires_grad_(True)
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    assert not out.hidden_states[-2].requires_grad


@pytest.mark.parametrize("head_trains", [False, True])
def test_assistant_loss_equals_transformers_loss_and_gradients(head_trains):
    cfg = tiny_cfg()
    model = lora(tiny_model(cfg), cfg)
    speed.unwrap(model).lm_head.weight.requires_grad_(head_trains)
    batch = collate(samples(cfg, n=3), pad_id=0)
    reference = model(**batch).loss
    reference.backward()
    want = grads(model)
    model.zero_grad()
    ours = speed.assistant_loss(model, batch, chunk=7)  # several chunks and a ragged last one
    ours.backward()
    got = grads(model)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys() and any("lm_head" in n for n in got) == head_trains
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=name)


def test_linear_cross_entropy_equals_cross_entropy_in_bf16():
    torch.manual_seed(0)
    hidden = torch.randn(50, 32, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 32, dtype=torch.bfloat16, requires_grad=True)
    targets = torch.randint(0, 300, (50,))
    ref = torch.nn.functional.cross_entropy((hidden @ weight.T).float(), targets)
    ref.backward()
    want = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ours = speed.linear_cross_entropy(hidden, weight, targets, chunk=16)
    ours.backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(hidden.grad, want[0], rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(weight.grad, want[1], rtol=2e-2, atol=1e-3)
    assert speed.linear_cross_entropy(hidden[:0], weight, targets[:0]).item() == 0.0


@pytest.mark.parametrize("attention", ["sdpa", speed.PACKED_ATTENTION])
def test_packed_row_gives_the_padded_batch_loss(attention):
    """Packing (per-sample attention from position ids) changes nothing: same loss, same gradients."""
    cfg = tiny_cfg()
    model = lora(tiny_model(cfg), cfg)
    parts = samples(cfg, n=3)
    reference = model(**collate(parts, pad_id=0)).loss
    reference.backward()
    want = grads(model)
    model.zero_grad()
    speed.set_language_attention(model, attention)
    ours = speed.assistant_loss(model, packed(parts))
    ours.backward()
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)
    # transformers' own forward on the packed row (position ids only; a cache would join the samples)
    torch.testing.assert_close(model(**packed(parts), use_cache=False).loss, reference, rtol=1e-5, atol=1e-6)


def per_sample_causal(q, k, v, cu_seq_lens, max_length):
    """What varlen flash attention computes, on (tokens, heads, dim): SDPA's causal kernel per sample."""
    bounds = cu_seq_lens.tolist()
    assert max_length == max(e - s for s, e in zip(bounds[:-1], bounds[1:]))
    outs = [torch.nn.functional.scaled_dot_product_attention(
        *(x[s:e].transpose(0, 1) for x in (q, k, v)), is_causal=True).transpose(0, 1)
        for s, e in zip(bounds[:-1], bounds[1:])]
    return torch.cat(outs)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_packed_attention_hands_flash_the_right_layout(monkeypatch, kv_heads):
    """The GPU path (one varlen call for the whole row) reshapes q/k/v, repeats grouped KV heads and
    passes the sample boundaries; here the flash kernel is stood in by its per-sample definition."""
    cfg = tiny_cfg()
    cfg.text.num_key_value_heads = kv_heads
    model = lora(tiny_model(cfg), cfg)
    parts = samples(cfg, n=3)
    reference = model(**collate(parts, pad_id=0)).loss
    reference.backward()
    want = grads(model)
    model.zero_grad()
    calls = []
    monkeypatch.setattr(speed, "FLASH_VARLEN", lambda *a: calls.append(a[3].tolist()) or per_sample_causal(*a))
    monkeypatch.setattr(speed, "_flash_fits", lambda *a: True)
    speed.set_language_attention(model, speed.PACKED_ATTENTION)
    ours = speed.assistant_loss(model, packed(parts))
    ours.backward()
    lengths = [len(s.input_ids) for s in parts]
    assert calls == [[0, *torch.tensor(lengths).cumsum(0).tolist()]] * cfg.text.num_hidden_layers
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available() or speed.FLASH_VARLEN is None, reason="needs CUDA flash varlen")
def test_flash_varlen_equals_per_sample_sdpa_on_gpu():
    torch.manual_seed(0)
    lengths = [700, 33, 1500, 1]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q, k, v = (torch.randn(sum(lengths), 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    out = speed.FLASH_VARLEN(q, k, v, cu, max(lengths))
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    ref = per_sample_causal(q, k, v, cu, max(lengths))
    want = [ref, *torch.autograd.grad(ref, (q, k, v), grad)]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_packed_attention_falls_back_to_sdpa_for_padded_batches():
    cfg = tiny_cfg()
    model = tiny_model(cfg)
    batch = collate(samples(cfg, n=2), pad_id=0)
    with torch.no_grad():
        want = model(**batch).logits
        speed.set_language_attention(model, speed.PACKED_ATTENTION)
        got = model(**batch).logits
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(got[real], want[real])


def test_checkpointed_layers_give_the_same_gradients():
    cfg = tiny_cfg()
    model = lora(tiny_model(cfg), cfg)
    batch = collate(samples(cfg), pad_id=0)
    model(**batch).loss.backward()
    want = grads(model)
    model.zero_grad()
    assert speed.checkpoint_layers(model, 1) == [0]
    layers = speed.decoder_layers(model)
    assert layers[0].gradient_checkpointing and not layers[1].gradient_checkpointing
    model(**batch).loss.backward()
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], msg=name)
    assert speed.checkpoint_layers(model, True) == [0, 1]


def test_lora_autocast_matches_fp32_adapters_within_bf16():
    cfg = tiny_cfg(dtype="bfloat16")
    model = lora(tiny_model(cfg), cfg)
    assert next(p for n, p in model.named_parameters() if "lora_A" in n).dtype == torch.float32
    batch = collate(samples(cfg), pad_id=0)
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    reference = model(**batch).loss
    assert speed.lora_autocast(model) == 14  # 7 projections x 2 layers
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(**batch).loss
    torch.testing.assert_close(ours.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_config_switches_levers(caplog):
    cfg = tiny_cfg(attn_implementation=speed.PACKED_ATTENTION, gradient_checkpointing=1)
    model = lora(tiny_model(cfg), cfg)
    done = speed.apply(model, cfg)
    assert any("vision tower: 1" in line for line in done)
    assert any("per-sample" in line for line in done)
    assert any("LoRA" in line for line in done)
    assert any("checkpointing: 1" in line for line in done)
    assert speed.unwrap(model).config.text_config._attn_implementation == speed.PACKED_ATTENTION
    assert speed.unwrap(model).config.vision_config._attn_implementation == "sdpa"
    assert speed.loss_chunk(cfg) == 4096 and speed.loss_chunk(tiny_cfg(loss_chunk=0)) is None


def test_packed_labels_never_cross_samples():
    cfg = tiny_cfg()
    batch = packed(samples(cfg, n=3))
    starts = (batch["position_ids"][0] == 0).nonzero().flatten()
    assert (batch["labels"][0, starts] == IGNORE).all()
