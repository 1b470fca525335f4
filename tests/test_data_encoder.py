"""The task encoder against transformers: image token counts, pixels, a forward pass; label masks per template."""

import random

import numpy as np
import pytest
import torch
from datakit import encoder, image, model_cfg, tokenizer
from omegaconf import OmegaConf
from PIL import Image
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from llavanext.data.encoder import IGNORE, collate, image_token_count, pack
from llavanext.data.images import (
    CLIP_STD,
    ImageProcessor,
    as_tensor,
    height_first,
    make_image_processor,
    pillow_orders_passes,
    resize,
)
from llavanext.data.templates import VICUNA_SYSTEM
from llavanext.model import hf_config

SHIPPED = ["tiny", "7b", "13b", "mistral_7b"]


def hf_processor(cfg):
    tok = tokenizer()
    return LlavaNextProcessor(image_processor=make_image_processor(cfg), tokenizer=tok,
                              patch_size=cfg.vision.patch_size,
                              vision_feature_select_strategy=cfg.vision_feature_select_strategy,
                              num_additional_image_tokens=1)


@pytest.mark.parametrize("name", SHIPPED)
def test_image_token_counts_equal_transformers(name):
    cfg = model_cfg(name)
    processor = hf_processor(cfg)
    rng = random.Random(name)
    tile = cfg.vision.image_size
    sizes = [(rng.randint(1, 4 * tile), rng.randint(1, 4 * tile)) for _ in range(300)]
    sizes += [tuple(p) for p in cfg.image_grid_pinpoints] + [(1, 1000), (1000, 1), (tile, tile)]
    want = processor._get_num_multimodal_tokens(image_sizes=sizes)["num_image_tokens"]
    assert [image_token_count(h, w, cfg) for h, w in sizes] == want


def test_image_tokens_equal_processor_output_and_forward_runs():
    """The processor's own expansion of `<image>` and ours agree; the model accepts our samples (no mismatch)."""
    cfg = model_cfg("tiny")
    processor, enc = hf_processor(cfg), encoder()
    model = LlavaNextForConditionalGeneration(hf_config(cfg, image_token_index=enc.image_token_id)).eval()
    rng = random.Random(1)
    samples = []
    for i in range(12):
        im = image(rng.randint(5, 300), rng.randint(5, 300), i)
        theirs = processor(images=[im], text="<image>", return_tensors="pt")["input_ids"]
        ours = enc.encode([{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}], [im])
        assert int((ours.input_ids == enc.image_token_id).sum()) == int((theirs == enc.image_token_id).sum())
        samples.append(ours)
    with torch.no_grad():
        for batch in (collate(samples[:6], enc.pad_id), collate(samples[6:], enc.pad_id)):
            assert torch.isfinite(model(**batch).loss)
        packed = pack(samples, enc.pad_id, 4096)
        assert torch.isfinite(model(**packed, use_cache=False).loss)


def byte_steps(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """|ours - theirs| in 1/255 steps of the uint8 pixels both were normalised from."""
    return ((ours - theirs) * torch.tensor(CLIP_STD).view(1, 3, 1, 1) * 255).abs().round()


@pytest.mark.parametrize("resizer", ["pil", "torch"])
@pytest.mark.parametrize("name,count", [("tiny", 40), ("7b", 3)])
def test_pixel_values_equal_transformers(name, count, resizer):
    """Stated tolerance against LlavaNextImageProcessorPil: none for `pil` (bit-identical); for `torch`,
    every pixel within 2/255 before normalisation and 99% of them equal. Noise images: the worst case."""
    cfg = OmegaConf.merge(model_cfg(name), {"image_resize": resizer})
    ours, theirs = ImageProcessor(cfg), make_image_processor(cfg)
    rng = random.Random(2)
    tile = cfg.vision.image_size
    for i in range(count):
        im = image(rng.randint(3, 3 * tile), rng.randint(3, 3 * tile), i)
        if i % 3 == 0:
            im = im.convert("L")  # greyscale input is converted to RGB by both
        want = theirs([im], return_tensors="pt")["pixel_values"][0]
        got = ours(im)
        assert got.dtype == want.dtype and got.shape == want.shape, im.size
        if resizer == "pil":
            assert torch.equal(got, want), (im.size, (got - want).abs().max())
        else:
            steps = byte_steps(got, want)
            assert steps.max() <= 2 and (steps == 0).float().mean() >= 0.99, (im.size, steps.max())


def test_torch_resize_follows_pillow_within_2_steps():
    """The resize alone, every direction (down, up, one axis, mixed), against Pillow on noise."""
    rng = np.random.RandomState(3)
    for i in range(150):
        width, height, new_width, new_height = (int(v) for v in rng.randint(1, 400, 4))
        im = image(height, width, i)
        want = torch.from_numpy(np.asarray(im.resize((new_width, new_height), Image.Resampling.BICUBIC)))
        got = resize(as_tensor(im), new_height, new_width)[0].permute(1, 2, 0)
        steps = (got.int() - want.int()).abs()
        assert steps.max() <= 2 and (steps == 0).float().mean() >= 0.98, ((width, height), (new_width, new_height))


def test_pillow_pass_order_is_predicted():
    """Our rule for which pass Pillow runs first predicts Pillow: its resize equals its own two one-axis
    resizes in the predicted order, and not in the other (noise makes the two orders differ)."""
    rng = np.random.RandomState(4)
    told_apart = height_first_seen = 0
    for i in range(300):
        width, height, new_width, new_height = (int(v) for v in rng.randint(2, 160, 4))
        if new_width == width or new_height == height:
            continue
        im = image(height, width, i)
        whole = np.asarray(im.resize((new_width, new_height), Image.Resampling.BICUBIC))
        across_first = np.asarray(im.resize((new_width, height), Image.Resampling.BICUBIC)
                                  .resize((new_width, new_height), Image.Resampling.BICUBIC))
        down_first = np.asarray(im.resize((width, new_height), Image.Resampling.BICUBIC)
                                .resize((new_width, new_height), Image.Resampling.BICUBIC))
        if np.array_equal(across_first, down_first):
            continue
        told_apart += 1
        predicted = down_first if height_first(width, height, new_width, new_height) else across_first
        assert np.array_equal(whole, predicted), ((width, height), (new_width, new_height))
        height_first_seen += height_first(width, height, new_width, new_height)
    assert told_apart > 250
    if pillow_orders_passes():
        assert height_first_seen > 30  # the rule was exercised, not only the horizontal-first default


# -- labels: hand-written expectations per template ------------------------------------------------
CONV = [{"from": "human", "value": "<image>\nWhat color are the shapes?"}, {"from": "gpt", "value": "red"},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "two"}]
EXPECTED = {
    "vicuna_v1": (f"<s>{VICUNA_SYSTEM} USER: <image>\nWhat color are the shapes? ASSISTANT: red</s>"
                  "USER: How many shapes are there? ASSISTANT: two</s>", [" red</s>", " two</s>"]),
    "mistral_instruct": ("<s>[INST] <image>\nWhat color are the shapes? [/INST] red</s>"
                         "[INST] How many shapes are there? [/INST] two</s>", [" red</s>", " two</s>"]),
    "chatml": ("<s><|im_start|>user\n<image>\nWhat color are the shapes?<|im_end|>\n<|im_start|>assistant\n"
               "red<|im_end|>\n<|im_start|>user\nHow many shapes are there?<|im_end|>\n<|im_start|>assistant\n"
               "two<|im_end|>\n", ["red<|im_end|>", "two<|im_end|>"]),
    # LLaVA's stage 1: the image, then the answers; the questions are dropped
    "plain": ("<s><image>red\ntwo\n", ["red\ntwo\n"]),
}


def spans(enc, sample):
    """The text (image tokens shown once per image) and the decoded runs of trained tokens."""
    tok = enc.tokenizer
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    shown = [t for i, t in enumerate(ids) if t != enc.image_token_id or i == 0 or ids[i - 1] != t]
    runs, current = [], []
    for t, label in zip(ids, labels):
        if label != IGNORE:
            assert label == t
            current.append(t)
        elif current:
            runs.append(current)
            current = []
    runs += [current] if current else []
    return tok.decode(shown), [tok.decode(r) for r in runs]


@pytest.mark.parametrize("template", list(EXPECTED))
def test_label_masks_per_template(template):
    enc = encoder(template)
    sample = enc.encode(CONV, [image(40, 60)])
    text, trained = spans(enc, sample)
    assert (text, trained) == EXPECTED[template]
    image_positions = sample.input_ids == enc.image_token_id
    assert int(image_positions.sum()) == image_token_count(40, 60, enc.model_cfg)
    assert (sample.labels[image_positions] == IGNORE).all()


def test_system_prompt_and_generation_prompt():
    enc = encoder("chatml")
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}]
    text, trained = spans(enc, enc.encode(conv))
    assert text == ("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\nHello<|im_end|>\n")
    assert trained == ["Hello<|im_end|>"]
    prompt = encoder("vicuna_v1").encode([{"from": "human", "value": "Hi"}], generation=True)
    assert enc.tokenizer.decode(prompt.input_ids) == f"<s>{VICUNA_SYSTEM} USER: Hi ASSISTANT:"
    assert (prompt.labels == IGNORE).all()


def test_openai_content_parts_equal_llava_markers():
    enc = encoder()
    parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]
    llava = [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}]
    a, b = enc.encode(parts, [image(30, 30)]), enc.encode(llava, [image(30, 30)])
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.labels, b.labels)


def test_truncation_cuts_text_never_an_image():
    enc = encoder(seq_length=120)
    long_answer = " ".join(["two red circles"] * 40)
    sample = enc.encode([{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": long_answer}],
                        [image(56, 56)])
    assert sample.truncated and len(sample.input_ids) == 120
    assert int((sample.input_ids == enc.image_token_id).sum()) == image_token_count(56, 56, enc.model_cfg)
    assert (sample.labels != IGNORE).any()


def test_an_unknown_resizer_is_refused_by_name():
    from llavanext.errors import ConfigError

    with pytest.raises(ConfigError, match=r"model.image_resize='lanczos'; choose from torch, pil"):
        ImageProcessor(OmegaConf.merge(model_cfg(), {"image_resize": "lanczos"}))


def test_a_run_config_from_before_image_resize_keeps_pillow():
    """Run folders written before model.image_resize existed were trained on Pillow's pixels: generate keeps them."""
    cfg = model_cfg()
    del cfg["image_resize"]
    OmegaConf.set_struct(cfg, True)
    assert ImageProcessor(cfg).resizer == "pil"
    assert ImageProcessor(model_cfg()).resizer == "torch"
