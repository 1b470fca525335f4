"""The fast decode step (`Decoder(variant=fused|unfused)`): transformers' math with fewer kernels.

On a GPU `decode=auto` uses it; here, in float32 on the tiny model (and a grouped-query copy of
it), it must give transformers' logits to rounding and exactly the tokens of `model.generate`.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from llavanext.assemble import assemble
from llavanext.cli.overrides import compose
from llavanext.decoding import Decoder, Sampling, fast_unsupported
from llavanext.errors import ConfigError
from llavanext.model import hf_config

FAST = ("fused", "unfused")


def tiny(kv_heads: int, attention: str = "sdpa"):
    """The tiny LLaVA-NeXT, random float32 weights; kv_heads=2 makes its 4 heads grouped-query."""
    model_cfg = compose("finetune", ["model=tiny", "data=demo", f"model.text.num_key_value_heads={kv_heads}"]).model
    config = hf_config(model_cfg)
    config._attn_implementation = attention
    from transformers import LlavaNextForConditionalGeneration

    torch.manual_seed(0)
    return model_cfg, LlavaNextForConditionalGeneration(config).eval()


@pytest.fixture(scope="module", params=[4, 2], ids=["mha", "gqa"])
def model(request):
    return tiny(request.param)


def image_prompt(model_cfg, rows: int = 1):
    """`rows` prompts of text and one 2x2-tile image (the same image), row i 5*i tokens shorter."""
    from llavanext.data.encoder import image_token_count
    from llavanext.data.images import make_image_processor

    side = 2 * model_cfg.vision.image_size
    g = torch.Generator().manual_seed(1)
    words = torch.randint(10, model_cfg.text.vocab_size, (30,), generator=g).tolist()
    ids = [1] + words[:10] + [model_cfg.image_token_index] * image_token_count(side, side, model_cfg) + words[10:]
    pixels = torch.randint(0, 255, (side, side, 3), generator=g, dtype=torch.uint8).numpy()
    pixel_values = make_image_processor(model_cfg)([Image.fromarray(pixels)], return_tensors="pt")["pixel_values"]
    input_ids = torch.full((rows, len(ids)), 3)  # 3: the pad token
    attention = torch.zeros_like(input_ids)
    for i in range(rows):  # row i: the prompt less 5*i words of text, left-padded
        row = ids[:1] + ids[1 + 5 * i:]
        input_ids[i, len(ids) - len(row):] = torch.tensor(row)
        attention[i, len(ids) - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "pixel_values": pixel_values.repeat(rows, 1, 1, 1, 1),
            "image_sizes": torch.tensor([[side, side]] * rows)}


def run(decoder, batch, sampling):
    """(tokens per step, the float32 logits every decode step gave)."""
    seen = []
    step = decoder.run_step
    decoder.run_step = lambda slot: seen.append(step(slot)) or seen[-1]
    with torch.no_grad():
        tokens = list(decoder.stream(batch, sampling))
    return tokens, torch.stack(seen)


def test_auto_keeps_transformers_forward_on_cpu(model):
    assert Decoder(model[1]).variant == "hf"
    with pytest.raises(ConfigError, match="variant"):
        Decoder(model[1], variant="fast")


@pytest.mark.parametrize("variant", FAST)
def test_fast_step_gives_transformers_logits(model, variant):
    """Left-padded batch with an image: every decode step's logits as transformers' forward gives them."""
    model_cfg, model = model
    batch = image_prompt(model_cfg, rows=2)
    sampling = Sampling(max_new_tokens=16)
    tokens, logits = run(Decoder(model, variant="hf"), batch, sampling)
    fast_tokens, fast_logits = run(Decoder(model, variant=variant), batch, sampling)
    assert fast_tokens == tokens
    torch.testing.assert_close(fast_logits, logits, atol=1e-5, rtol=1e-5)


def test_fused_tokens_equal_transformers_generate(model):
    """Greedy and seeded sampling: exactly `model.generate`'s tokens, one prompt and a padded batch."""
    model_cfg, model = model
    settings = [(Sampling(max_new_tokens=12), {"do_sample": False}),
                (Sampling(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7),
                 {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3})]
    decoder = Decoder(model, variant="fused")
    for rows in (1, 3):
        batch = image_prompt(model_cfg, rows)
        width = batch["input_ids"].shape[1]
        for sampling, hf in settings[: 2 if rows == 1 else 1]:
            torch.manual_seed(7)
            with torch.no_grad():
                reference = model.generate(**batch, max_new_tokens=12, eos_token_id=None, pad_token_id=3, **hf)
            ours = run(decoder, batch, sampling)[0]
            assert [list(r) for r in zip(*ours)] == reference[:, width:].tolist(), (rows, sampling)


def test_fused_batch_equals_one_at_a_time(model):
    model_cfg, model = model
    batch = image_prompt(model_cfg, rows=3)
    decoder = Decoder(model, variant="fused")
    together = [list(r) for r in zip(*run(decoder, batch, Sampling(max_new_tokens=10))[0])]
    for i in range(3):
        keep = batch["attention_mask"][i].bool()
        alone = {"input_ids": batch["input_ids"][i, keep][None], "attention_mask": torch.ones(1, int(keep.sum())),
                 "pixel_values": batch["pixel_values"][i:i + 1], "image_sizes": batch["image_sizes"][i:i + 1]}
        assert [t[0] for t in run(decoder, alone, Sampling(max_new_tokens=10))[0]] == together[i]


def test_fusion_shares_the_weights_memory():
    """q/k/v and gate/up become row blocks of one tensor: no new memory, same state_dict, same
    forward; a second Decoder on the same model reuses them."""
    model_cfg, model = tiny(2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = image_prompt(model_cfg)
    with torch.no_grad():
        logits = model(**batch).logits
    decoder = Decoder(model, variant="fused")
    attn = model.model.language_model.layers[0].self_attn
    qkv = decoder.fast.layers[0][1]
    assert qkv.shape[0] == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert attn.q_proj.weight.data_ptr() == qkv.data_ptr()
    assert attn.v_proj.weight.data_ptr() == qkv[-attn.v_proj.out_features:].data_ptr()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits)
    assert Decoder(model, variant="fused").fast.layers[0][1] is qkv


def test_merged_lora_model_decodes_fused():
    """generate merges LoRA before decoding: the merged model's Linears fuse; unmerged ones can't."""
    cfg = compose("finetune", ["model=tiny", "data=demo", "peft=lora", "parts.language_model=lora"])
    torch.manual_seed(0)
    model = assemble(cfg).model
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    language_model = next(m for n, m in model.named_modules() if n.endswith("language_model"))
    assert "LoRA" in fast_unsupported(language_model)
    model = model.merge_and_unload().eval()
    batch = image_prompt(cfg.model, rows=2)
    with torch.no_grad():
        reference = model.generate(**batch, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=3)
    ours = run(Decoder(model, variant="fused"), batch, Sampling(max_new_tokens=8))[0]
    assert [list(r) for r in zip(*ours)] == reference[:, batch["input_ids"].shape[1]:].tolist()


def test_fused_step_compiles_as_one_graph():
    """decode=compile traces the step with fullgraph=True: no graph breaks (checked here without a GPU)."""
    model_cfg, model = tiny(2)
    batch = image_prompt(model_cfg, rows=2)
    sampling = Sampling(max_new_tokens=5)
    tokens, logits = run(Decoder(model, variant="fused"), batch, sampling)
    decoder = Decoder(model, variant="fused")
    decoder.step = torch.compile(decoder.step, backend="aot_eager", fullgraph=True, dynamic=False)
    compiled_tokens, compiled_logits = run(decoder, batch, sampling)
    assert compiled_tokens == tokens
    torch.testing.assert_close(compiled_logits, logits, atol=1e-5, rtol=1e-5)
