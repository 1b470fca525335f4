"""Training from imported checkpoints: `model.from_pretrained` and the stage-1 part keys.

Our model is compared with transformers' own `LlavaNextForConditionalGeneration` loaded from
the same folder with its own config: equal logits (fp32, <= 1e-5) mean the weights, the
config we rebuild from the model group and the image tokens our encoder lays out all agree.
"""

from __future__ import annotations

import logging

import pytest
import torch
from hf_fixtures import (
    MISTRAL_OVERRIDES,
    MISTRAL_TEXT,
    SIGLIP_OVERRIDES,
    SIGLIP_VISION,
    TINY_VISION,
    VICUNA_TEXT,
    batch,
    llava_config,
    save_clip,
    save_llava,
    save_lm,
)

from llavanext import importer
from llavanext.assemble import assemble
from llavanext.cli.overrides import compose
from llavanext.errors import CheckpointError, ConfigError
from llavanext.module import LlavaNextModule


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVANEXT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def do_import(source, name):
    return importer.run(compose("import", [f"source={source}", f"name={name}"]))


def finetune_cfg(*overrides):
    return compose("finetune", ["model=tiny", "data=mock", "model.tokenizer=null", *overrides])


TEXTS = {"vicuna": (VICUNA_TEXT, [], "vicuna_v1"), "mistral": (MISTRAL_TEXT, MISTRAL_OVERRIDES, "mistral_instruct")}
VISIONS = {"default": (TINY_VISION, []), "full": (SIGLIP_VISION, SIGLIP_OVERRIDES)}


@pytest.mark.parametrize("strategy", ["default", "full"])
@pytest.mark.parametrize("text", TEXTS)
def test_module_logits_equal_transformers_after_import(tmp_path, text, strategy, caplog):
    from transformers import LlavaNextForConditionalGeneration

    text_config, overrides, template = TEXTS[text]
    vision_config, vision_overrides = VISIONS[strategy]
    src = save_llava(tmp_path / "src", llava_config(text_config, strategy, vision_config))
    do_import(src, "test/llava")
    cfg = finetune_cfg("model.from_pretrained=test/llava", f"model.vision_feature_select_strategy={strategy}",
                       *overrides, *vision_overrides)
    with caplog.at_level(logging.WARNING):
        built = assemble(cfg)
    assert not [r for r in caplog.records if "but the checkpoint" in r.getMessage()]  # the configs agree
    assert built.image_token_id == 4 and built.tokenizer is not None  # both from the checkpoint
    module = LlavaNextModule(built.model, cfg.optim, 10, 1).eval()
    reference = LlavaNextForConditionalGeneration.from_pretrained(src).eval()
    inputs = batch(cfg.model, built.tokenizer, built.image_token_id, template)
    assert inputs["input_ids"].shape[0] == 2 and (inputs["input_ids"] == 4).sum() > 100
    with torch.no_grad():
        ours, theirs = module(**inputs), reference(**inputs)
    assert ours.logits.dtype == torch.float32
    assert (ours.logits - theirs.logits).abs().max().item() <= 1e-5
    assert torch.allclose(ours.loss, theirs.loss, atol=1e-6)


def test_full_strategy_with_a_clip_tower_is_refused_before_anything_is_built():
    with pytest.raises(ConfigError, match="full keeps CLIP's class token"):
        assemble(finetune_cfg("model.vision_feature_select_strategy=full"))


def test_a_checkpoint_that_does_not_fit_names_tensor_shapes_and_the_group_that_fits(tmp_path):
    do_import(save_llava(tmp_path / "src"), "test/llava")
    # the tiny checkpoint into model=7b: the error comes before a 7B model is built or any weight read
    cfg = compose("finetune", ["model=7b", "data=mock", "model.from_pretrained=test/llava"])
    with pytest.raises(CheckpointError) as e:
        assemble(cfg)
    message = str(e.value)
    assert message == ("model.from_pretrained=test/llava: tensor model.image_newline has shape (96,) in the checkpoint "
                       "but model=7b expects (4096,); model=tiny fits it")

    wide = dict(VICUNA_TEXT, hidden_size=128)
    do_import(save_lm(tmp_path / "lm", wide), "test/wide-lm")
    with pytest.raises(CheckpointError, match=r"model.language_model_from_pretrained=test/wide-lm: tensor "
                                              r".* has shape \(300, 128\) in the checkpoint but model=tiny expects "
                                              r"\(512, 96\); no model group fits it; the closest is model=tiny with "
                                              r"model.text.hidden_size=128"):
        assemble(finetune_cfg("model.language_model_from_pretrained=test/wide-lm"))


def test_a_checkpoint_of_another_kind_or_a_missing_one_is_refused(tmp_path):
    do_import(save_lm(tmp_path / "lm"), "test/lm")
    with pytest.raises(ConfigError, match="test/lm is a causal_lm checkpoint: give it as "
                                          "model.language_model_from_pretrained"):
        assemble(finetune_cfg("model.from_pretrained=test/lm"))
    with pytest.raises(CheckpointError, match="model.vision_model_from_pretrained: 'test/nothing': no model of that name"):
        assemble(finetune_cfg("model.vision_model_from_pretrained=test/nothing"), tokenizer_needed=False)


def test_stage1_assembly_from_two_store_entries(tmp_path):
    from transformers import AutoModelForCausalLM, CLIPModel

    do_import(save_lm(tmp_path / "lm"), "test/lm")
    do_import(save_clip(tmp_path / "clip"), "test/clip")
    cfg = compose("pretrain", ["model=tiny", "data=mock", "model.tokenizer=null",
                               "model.language_model_from_pretrained=test/lm",
                               "model.vision_model_from_pretrained=test/clip"])
    built = assemble(cfg)
    # the LM's tokenizer (300 words, no <image>) gains <image> after its vocabulary; the embeddings grow to 512
    assert built.image_token_id == 300 and len(built.tokenizer) == 301
    model = built.model
    lm = AutoModelForCausalLM.from_pretrained(tmp_path / "lm").eval()
    ids = torch.randint(3, 300, (2, 9))
    with torch.no_grad():
        ours = model.eval()(input_ids=ids).logits
        theirs = lm(input_ids=ids).logits
    assert ours.shape[-1] == 512
    assert (ours[..., :300] - theirs).abs().max().item() <= 1e-5
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():  # the feature layer LLaVA reads (the tower may skip the layers after it)
        assert torch.equal(model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2],
                           clip.vision_model(pixels, output_hidden_states=True).hidden_states[-2])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("multi_modal_projector" in n or "image_newline" in n for n in trainable)
