"""The task encoder against transformers: image token counts, pixels, a forward pass; label masks per template."""

import random

import pytest
import torch
from datakit import encoder, image, model_cfg, tokenizer
from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

from llavanext.data.encoder import (
    IGNORE,
    ImageProcessor,
    collate,
    image_token_count,
    make_image_processor,
    pack,
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


@pytest.mark.parametrize("name,count", [("tiny", 40), ("7b", 3)])
def test_pixel_values_equal_transformers(name, count):
    """Stated tolerance: none. Our pixels are bit-identical to LlavaNextImageProcessorPil's."""
    cfg = model_cfg(name)
    ours, theirs = ImageProcessor(cfg), make_image_processor(cfg)
    rng = random.Random(2)
    tile = cfg.vision.image_size
    for i in range(count):
        im = image(rng.randint(3, 3 * tile), rng.randint(3, 3 * tile), i)
        if i % 3 == 0:
            im = im.convert("L")  # greyscale input is converted to RGB by both
        want = theirs([im], return_tensors="pt")["pixel_values"][0]
        got = ours(im)
        assert got.dtype == want.dtype and torch.equal(got, want), (im.size, (got - want).abs().max())


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
