"""`llavanext import` and the model store: sources, kinds, validation, atomic writes, bad inputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hf_fixtures import fake_hf_cache, llava_config, save_clip, save_llava, save_lm, tree
from safetensors.torch import load_file, save_file

from llavanext import importer, store
from llavanext.cli.overrides import compose
from llavanext.errors import CheckpointError


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVANEXT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def do_import(source, **keys):
    return importer.run(compose("import", [f"source={source}"] + [f"{k}={v}" for k, v in keys.items()]))


def logits_of(model, seed=0):
    torch.manual_seed(seed)
    ids = torch.randint(5, 300, (1, 12))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_llava_next_import_is_a_transformers_folder_with_its_model_group(home, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    src = save_llava(tmp_path / "src")
    entry = do_import(src, name="me/tiny")
    assert entry == home / "models/me/tiny" and store.resolve("me/tiny") == entry
    meta = store.read_meta(entry)
    assert meta["kind"] == "llava_next" and meta["model_group"] == "tiny" and meta["source"] == str(src)
    assert not list(entry.glob("*.bin")) and (entry / "tokenizer.json").is_file()
    ours = LlavaNextForConditionalGeneration.from_pretrained(entry)
    theirs = LlavaNextForConditionalGeneration.from_pretrained(src)
    assert torch.equal(logits_of(ours), logits_of(theirs))
    assert store.entries() == [("me/tiny", meta)]


def test_repeated_import_is_a_no_op_and_force_replaces(home, tmp_path):
    src = save_llava(tmp_path / "src")
    entry = do_import(src, name="me/tiny")
    before = tree(entry)
    time.sleep(0.01)
    do_import(src, name="me/tiny")
    assert tree(entry) == before
    save_llava(src, seed=5)  # the source changed: only force=true brings the change in
    do_import(src, name="me/tiny", force="true")
    assert tree(entry) != before
    assert torch.equal(load_file(entry / "model.safetensors")["image_newline"],
                       load_file(src / "model.safetensors")["image_newline"])
    assert [p.name for p in entry.parent.iterdir()] == ["tiny"]  # no temp or old folder left behind


def test_hf_source_resolves_offline_through_the_local_cache(home, tmp_path, hf_cache):
    commit = fake_hf_cache(hf_cache, "llava-hf/tiny-llava", save_llava(tmp_path / "src"))
    assert store.resolve("hf://llava-hf/tiny-llava").name == commit
    assert store.resolve(f"hf://llava-hf/tiny-llava@{commit}").name == commit
    entry = do_import("hf://llava-hf/tiny-llava")
    meta = store.read_meta(entry)
    assert entry == home / "models/llava-hf/tiny-llava"
    assert meta["source"] == "hf://llava-hf/tiny-llava" and meta["revision"] == commit
    assert not (entry / "model.safetensors").is_symlink()  # a copy of the blob, not a link into the cache
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache .* HF_HUB_OFFLINE"):
        store.resolve("hf://llava-hf/not-downloaded")


def test_language_model_and_clip_kinds(home, tmp_path):
    from transformers import AutoModelForCausalLM, CLIPModel, CLIPVisionModel

    lm = do_import(save_lm(tmp_path / "lm"), name="me/lm")
    assert store.read_meta(lm)["kind"] == "causal_lm"
    assert store.read_meta(lm)["model_group"] == "tiny"  # a smaller vocabulary fits: it grows to the group's
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(lm)),
                       logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "lm")))

    clip_src = save_clip(tmp_path / "clip")
    clip = do_import(clip_src, name="me/clip")
    meta = store.read_meta(clip)
    assert meta["kind"] == "clip_vision" and meta["model_group"] == "tiny"
    assert json.loads((clip / "config.json").read_text())["model_type"] == "clip_vision_model"  # text half dropped
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        ours = CLIPVisionModel.from_pretrained(clip)(pixels).last_hidden_state
        theirs = CLIPModel.from_pretrained(clip_src).vision_model(pixels).last_hidden_state
    assert torch.equal(ours, theirs)


def test_kind_can_be_forced_and_a_wrong_one_is_refused(home, tmp_path):
    src = save_lm(tmp_path / "lm")
    with pytest.raises(CheckpointError, match="loaded as clip_vision, the checkpoint lacks"):
        do_import(src, name="me/lm", kind="clip_vision")
    assert do_import(src, name="me/lm", kind="causal_lm").is_dir()


def test_import_suggests_overrides_when_no_group_fits(home, tmp_path, capsys):
    big = dict(llava_config().text_config.to_dict(), hidden_size=128, model_type="llama")
    entry = do_import(save_llava(tmp_path / "src", llava_config(text=big)), name="me/wide")
    assert store.read_meta(entry)["model_group"] is None
    assert "model.text.hidden_size=128" in capsys.readouterr().out.replace("\n", "")


def test_pickle_weights_need_opt_in_and_load_without_running_code(home, tmp_path):
    from transformers import LlavaNextForConditionalGeneration

    src = save_llava(tmp_path / "src")
    model = LlavaNextForConditionalGeneration.from_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="only pickle weights .*allow_pickle=true"):
        do_import(src, name="me/pickled")
    assert not (home / "models/me/pickled").exists()
    entry = do_import(src, name="me/pickled", allow_pickle="true")
    assert not list(entry.glob("*.bin")) and (entry / "model.safetensors").is_file()
    assert torch.equal(logits_of(LlavaNextForConditionalGeneration.from_pretrained(entry)), logits_of(model))

    class Evil:  # what a hostile pickle does: call a function while being loaded
        def __reduce__(self):
            return (os.makedirs, (str(tmp_path / "pwned"),))

    torch.save({"weight": Evil()}, src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        do_import(src, name="me/evil", allow_pickle="true")
    assert not (tmp_path / "pwned").exists() and not (home / "models/me/evil").exists()


def break_shape(src: Path):
    weights = load_file(src / "model.safetensors")
    key = next(k for k in weights if k.endswith("q_proj.weight"))
    weights[key] = torch.zeros(5, 5)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})


def truncate(src: Path):
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])


def unknown_architecture(src: Path):
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "bert", "architectures": ["BertModel"]}))


BAD = {
    "missing folder": (lambda src: __import__("shutil").rmtree(src), "no model of that name in the store"),
    "missing config.json": (lambda src: (src / "config.json").unlink(), "has no config.json"),
    "unknown architecture": (unknown_architecture, "model_type 'bert' .* is not one llavanext imports"),
    "shape mismatch": (break_shape, r"q_proj.weight has shape \(5, 5\) in the checkpoint but the model expects "
                                    r"\(96, 96\)"),
    "truncated safetensors": (truncate, "damaged or cut short"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_gets_one_error_and_leaves_the_store_untouched(home, tmp_path, case):
    do_import(save_llava(tmp_path / "good"), name="me/tiny")
    src = save_llava(tmp_path / "src")
    spoil, message = BAD[case]
    spoil(src)
    before = tree(home)
    with pytest.raises(CheckpointError, match=message):
        do_import(src, name="me/tiny", force="true")  # even replacing an entry: the old one stays whole
    with pytest.raises(CheckpointError, match=message):
        do_import(src, name="other/new")
    assert tree(home) == before


def test_an_import_killed_while_writing_leaves_no_half_entry(home, tmp_path):
    do_import(save_llava(tmp_path / "good"), name="me/tiny")
    before = tree(home)
    src = save_llava(tmp_path / "src", seed=3)
    code = ("import sys; from llavanext import importer; from llavanext.cli.overrides import compose; "
            "importer.run(compose('import', sys.argv[1:]))")
    env = {**os.environ, "LLAVANEXT_HOME": str(home)}
    for name in ("me/tiny", "me/new"):  # replacing an entry, and writing a new one
        proc = subprocess.Popen([sys.executable, "-c", code, f"source={src}", f"name={name}", "force=true"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        org = home / "models" / name.split("/")[0]
        deadline = time.time() + 120
        while not list(org.glob(".*.tmp-*")):  # the temp folder appears: the import is writing
            assert proc.poll() is None and time.time() < deadline, "the import ended before it was caught writing"
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert [n for n, _ in store.entries()] == ["me/tiny"]
        assert {k: v for k, v in tree(home).items() if ".tmp-" not in k} == before
    for name in ("me/tiny", "me/new"):  # the next import of a name clears what a killed one left
        do_import(src, name=name, force="true")
    assert sorted(p.name for p in (home / "models/me").iterdir()) == ["new", "tiny"]


def test_cli_import_from_hf_cache_offline_and_list(tmp_path):
    cache = tmp_path / "hf-cache"
    fake_hf_cache(cache, "llava-hf/tiny-llava", save_llava(tmp_path / "src"))
    env = {**os.environ, "LLAVANEXT_HOME": str(tmp_path / "home"), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = lambda *args: subprocess.run([sys.executable, "-m", "llavanext", *args], env=env, cwd=tmp_path,  # noqa: E731
                                       capture_output=True, text=True)
    done = run("import", "source=hf://llava-hf/tiny-llava")
    assert done.returncode == 0, done.stderr
    assert "llavanext finetune model=tiny model.from_pretrained=llava-hf/tiny-llava" in done.stdout
    listed = run("import", "--list")
    assert listed.returncode == 0 and "llava-hf/tiny-llava" in listed.stdout and "llava_next" in listed.stdout
    bad = run("import", "source=hf://llava-hf/absent")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert "hf://llava-hf/absent is not in the local Hugging Face cache" in bad.stderr
