"""Packing: the packed batch's loss equals the unpacked batch's, and attention never crosses samples."""

import random

import torch
from datakit import encoder, image, model_cfg
from transformers import LlavaNextForConditionalGeneration

from llavanext.data.encoder import IGNORE, collate, pack
from llavanext.model import hf_config


def samples(n=5):
    enc = encoder()
    rng = random.Random(0)
    out = []
    for i in range(n):
        images = [image(rng.randint(20, 150), rng.randint(20, 150), i)] if i % 3 else []
        marker = "<image>\n" if images else ""
        conv = [{"from": "human", "value": f"{marker}What color are the shapes?"},
                {"from": "gpt", "value": rng.choice(["red", "two red circles", "blue"])}]
        if i % 2:
            conv += [{"from": "human", "value": "How many?"}, {"from": "gpt", "value": "two"}]
        out.append(enc.encode(conv, images))
    return enc, out


def tiny_model(enc):
    torch.manual_seed(0)
    config = hf_config(model_cfg(), image_token_index=enc.image_token_id)
    config._attn_implementation = "sdpa"
    return LlavaNextForConditionalGeneration(config).eval()


def test_packed_batch_layout():
    enc, batch = samples()
    packed = pack(batch, enc.pad_id, pack_length=4096)
    assert set(packed) == {"input_ids", "position_ids", "labels", "pixel_values", "image_sizes"}
    assert packed["input_ids"].shape == packed["position_ids"].shape == (1, sum(len(s.input_ids) for s in batch))
    starts = (packed["position_ids"][0] == 0).nonzero().flatten().tolist()
    assert starts == [sum(len(s.input_ids) for s in batch[:i]) for i in range(len(batch))]
    # a row limit splits the samples into several rows, each within the limit
    rows = pack(batch, enc.pad_id, pack_length=max(len(s.input_ids) for s in batch))
    assert rows["input_ids"].shape[0] > 1 and rows["input_ids"].shape[1] <= max(len(s.input_ids) for s in batch)
    assert int((rows["labels"] != IGNORE).sum()) == int((packed["labels"] != IGNORE).sum())


def test_packed_loss_equals_unpacked_loss():
    enc, batch = samples()
    model = tiny_model(enc)
    with torch.no_grad():
        unpacked = model(**collate(batch, enc.pad_id), use_cache=False).loss
        packed = model(**pack(batch, enc.pad_id, pack_length=4096), use_cache=False).loss
        several_rows = model(**pack(batch, enc.pad_id, pack_length=400), use_cache=False).loss
    torch.testing.assert_close(packed, unpacked, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(several_rows, unpacked, rtol=1e-5, atol=1e-5)


def test_attention_never_crosses_samples():
    """Changing the first sample's tokens leaves the logits of the samples after it unchanged."""
    enc, batch = samples(3)
    model = tiny_model(enc)
    packed = pack(batch, enc.pad_id, pack_length=4096)
    first = len(batch[0].input_ids)
    changed = {k: v.clone() for k, v in packed.items()}
    text = changed["input_ids"][0, :first] != enc.image_token_id
    changed["input_ids"][0, :first][text] = 7
    with torch.no_grad():
        a = model(**packed, use_cache=False).logits
        b = model(**changed, use_cache=False).logits
    assert not torch.allclose(a[0, :first], b[0, :first])
    torch.testing.assert_close(a[0, first:], b[0, first:], rtol=1e-5, atol=1e-5)
