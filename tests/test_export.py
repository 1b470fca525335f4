"""`llavanext export`: import -> train a few steps -> export -> plain transformers / peft give our logits."""

from __future__ import annotations

import json

import pytest
import torch
from hf_fixtures import images, save_clip, save_llava, save_lm
from safetensors.torch import load_file

from conftest import cli
from llavanext import export, importer, train
from llavanext.assemble import from_run
from llavanext.cli.overrides import compose
from llavanext.data.encoder import image_token_count
from llavanext.data.templates import TEMPLATES
from llavanext.errors import ConfigError
from llavanext.module import LlavaNextModule

TRAIN = ["model=tiny", "data=mock", "model.tokenizer=null", "data.num_samples=8", "data.image_sizes=[[56,112]]",
         "data.text_tokens=[10,20]", "data.seq_length=256", "data.micro_batch_size=2", "trainer.max_steps=3",
         "trainer.checkpoint_every=3", "trainer.progress_bar=none", "trainer.print_every=0",
         "trainer.accelerator=cpu", "optim.lr=1e-3", "optim.warmup_steps=1", "optim.fused=false"]
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]}]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVANEXT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def do_import(source, name):
    importer.run(compose("import", [f"source={source}", f"name={name}"]))


def train_run(tmp_path, command, *overrides):
    run_dir = tmp_path / f"run-{command}"
    train.run(compose(command, [*TRAIN, *overrides, f"run_dir={run_dir}"]))
    return run_dir


def do_export(checkpoint, out, *overrides):
    return export.run(compose("export", [f"checkpoint={checkpoint}", f"out={out}", *overrides]))


def processed(folder):
    """A prompt and an image through the exported AutoProcessor, as a user of the folder would."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    prompt = processor.apply_chat_template(MESSAGES, add_generation_prompt=True)
    return processor, processor(text=[prompt], images=[images()[0]], return_tensors="pt")


def our_logits(run_dir, inputs):
    cfg, built = from_run(run_dir)
    module = LlavaNextModule(built.model, cfg.optim, 1, 0).eval()
    with torch.no_grad():
        return module(**inputs).logits


def hf_logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_round_trip_import_finetune_export_load(tmp_path, lora):
    from transformers import AutoModelForImageTextToText, LlavaNextForConditionalGeneration

    src = save_llava(tmp_path / "src")
    do_import(src, "test/llava")
    run_dir = train_run(tmp_path, "finetune", "model.from_pretrained=test/llava",
                        *(["peft=lora", "peft.r=4", "peft.dropout=0.0"] if lora else []))
    out = do_export(run_dir, tmp_path / "out")

    processor, inputs = processed(out)
    # the processor lays out as many image tokens as our encoder and the model expect
    assert int((inputs["input_ids"] == 4).sum()) == image_token_count(60, 100, compose("finetune", TRAIN).model)
    exported = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    assert isinstance(exported, LlavaNextForConditionalGeneration)
    assert not list(out.glob("*.bin")) and not any("lora" in k for k in load_file(out / "model.safetensors"))
    ours = our_logits(run_dir, inputs)
    assert (hf_logits(exported, inputs) - ours).abs().max().item() <= 1e-5
    # ... and training moved the weights: the export is not the imported model again
    source = LlavaNextForConditionalGeneration.from_pretrained(src)
    assert (hf_logits(source, inputs) - ours).abs().max().item() > 1e-3

    if lora:
        from peft import PeftModel

        adapter = do_export(run_dir, tmp_path / "adapter", "merge_lora=false")
        assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
        assert all("lora_" in k for k in load_file(adapter / "adapter_model.safetensors"))
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == str((adapter / "base").resolve())
        base = AutoModelForImageTextToText.from_pretrained(config["base_model_name_or_path"], local_files_only=True)
        with_adapter = PeftModel.from_pretrained(base, adapter)
        assert (hf_logits(with_adapter, inputs) - ours).abs().max().item() <= 1e-5


def test_exported_processor_and_config_agree_with_the_run(tmp_path):
    from transformers import AutoConfig

    do_import(save_llava(tmp_path / "src"), "test/llava")
    run_dir = train_run(tmp_path, "finetune", "model.from_pretrained=test/llava", "trainer.max_steps=1",
                        "trainer.checkpoint_every=1")
    out = tmp_path / "out"
    done = cli("export", f"checkpoint={run_dir}", f"out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model_cfg = compose("finetune", TRAIN).model
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    processor, inputs = processed(out)
    pinpoints = [list(p) for p in model_cfg.image_grid_pinpoints]
    assert config.image_grid_pinpoints == pinpoints == processor.image_processor.image_grid_pinpoints
    assert config.vision_feature_layer == -2
    assert config.vision_feature_select_strategy == processor.vision_feature_select_strategy == "default"
    assert processor.patch_size == config.vision_config.patch_size and processor.num_additional_image_tokens == 1
    assert config.image_token_index == processor.tokenizer.convert_tokens_to_ids("<image>") == 4
    # the tiles are the ones our encoder trains on (padding tiles beyond them are ignored by the model)
    from llavanext.data.images import make_image_processor

    ours = make_image_processor(model_cfg)([images()[0]], return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(inputs["pixel_values"][0, : ours.shape[0]], ours, atol=1e-6)
    with pytest.raises(ConfigError, match="already holds files"):
        do_export(run_dir, out)
    with pytest.raises(ConfigError, match="give checkpoint=..."):
        export.run(compose("export", [f"out={out}"]))

    from transformers import AutoModelForImageTextToText

    shards = do_export(run_dir, tmp_path / "shards", "max_shard_size=300KB")
    weights = json.loads((shards / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(weights.values())) > 2 and not (shards / "model.safetensors").exists()
    whole = load_file(out / "model.safetensors")
    resharded = AutoModelForImageTextToText.from_pretrained(shards, local_files_only=True)
    single = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    assert all(torch.equal(a, b) for a, b in zip(resharded.state_dict().values(), single.state_dict().values()))
    assert len(whole) == len(weights)


@pytest.mark.parametrize("name", TEMPLATES)
def test_chat_template_renders_as_the_training_template(name):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = TEMPLATES[name]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    jinja = env.from_string(export.chat_template(name, bos="<s>"))
    conversations = [
        [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A red circle."},
         {"role": "user", "content": "And its size?"}, {"role": "assistant", "content": "Small."}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nColour?"},
         {"role": "assistant", "content": "Blue."}],
        [{"role": "user", "content": "<image>\nDescribe it."}],  # a prompt for generation
    ]
    for conversation in conversations:
        generation = conversation[-1]["role"] == "user"
        expected = "<s>" + "".join(s.text for s in template.render(conversation, generation=generation))
        assert jinja.render(messages=conversation, add_generation_prompt=generation) == expected
    as_items = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert jinja.render(messages=as_items) == jinja.render(messages=[{"role": "user", "content": "<image>\nWhat is it?"}])


def test_sharded_checkpoint_folder_is_consolidated(tmp_path):
    import torch.distributed.checkpoint as dcp

    do_import(save_llava(tmp_path / "src"), "test/llava")
    run_dir = train_run(tmp_path, "finetune", "model.from_pretrained=test/llava", "peft=lora", "peft.r=4",
                        "trainer.max_steps=1", "trainer.checkpoint_every=1")
    from_file = load_file(do_export(run_dir, tmp_path / "from-file") / "model.safetensors")

    # rewrite the checkpoint as Lightning's FSDPStrategy(state_dict_type="sharded") does: a folder of that name
    checkpoints = run_dir / "checkpoints"
    checkpoint = torch.load(checkpoints / "last.ckpt", weights_only=True)
    for path in checkpoints.glob("*.ckpt"):
        path.unlink()
    dcp.save({"model": checkpoint.pop("state_dict"), "optimizer_0": checkpoint.pop("optimizer_states")[0]},
             checkpoint_id=checkpoints / "last.ckpt", no_dist=True)
    torch.save(checkpoint, checkpoints / "last.ckpt" / "meta.pt")

    from_folder = load_file(do_export(run_dir, tmp_path / "from-folder") / "model.safetensors")
    assert from_folder.keys() == from_file.keys()
    assert all(torch.equal(from_folder[k], v) for k, v in from_file.items())


def test_stage1_from_two_store_entries_trains_and_exports(tmp_path):
    from transformers import AutoModelForImageTextToText

    do_import(save_lm(tmp_path / "lm"), "test/lm")
    do_import(save_clip(tmp_path / "clip"), "test/clip")
    run_dir = train_run(tmp_path, "pretrain", "model.language_model_from_pretrained=test/lm",
                        "model.vision_model_from_pretrained=test/clip")
    out = do_export(run_dir, tmp_path / "out")
    processor, inputs = processed(out)
    assert processor.tokenizer.convert_tokens_to_ids("<image>") == 300
    exported = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True)
    assert (hf_logits(exported, inputs) - our_logits(run_dir, inputs)).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_export_of_a_real_fsdp2_run_matches_torch_consolidation(tmp_path):
    """strategy=fsdp on two CPU processes writes sharded folders; the export holds exactly their weights."""
    import os
    import subprocess
    import sys

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForImageTextToText

    run_dir = tmp_path / "run"
    args = ["finetune", "executor=local", "executor.devices=2", "strategy=fsdp", *TRAIN, "trainer.max_steps=2",
            "trainer.checkpoint_every=2", "model.tokenizer=demo", f"hydra.run.dir={run_dir}"]
    done = subprocess.run([sys.executable, "-m", "llavanext", *args], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert (run_dir / "checkpoints" / "last.ckpt" / ".metadata").is_file()

    out = do_export(run_dir, tmp_path / "out")
    dcp_to_torch_save(run_dir / "checkpoints" / "last.ckpt", tmp_path / "whole.pt")
    whole = {k.removeprefix("model."): v for k, v in torch.load(tmp_path / "whole.pt")["state_dict"].items()}
    exported = AutoModelForImageTextToText.from_pretrained(out, local_files_only=True).state_dict()
    assert exported.keys() == whole.keys()
    assert all(torch.equal(exported[k], v) for k, v in whole.items())
