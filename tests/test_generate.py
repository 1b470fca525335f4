"""`llavanext generate`: checkpoints of every kind, prompts with 0-2 images, batches, bad input.

Every model here is the tiny config with random weights: the answers are noise, but noise that
must be the same whichever way it is asked for (one at a time or batched, run folder or HF
folder, library or CLI) and the same as transformers' own `generate`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from llavanext.assemble import assemble
from llavanext.cli.overrides import compose
from llavanext.decoding import Decoder, Sampling
from llavanext.errors import CheckpointError, ConfigError, DataError
from llavanext.generate import Request, load, run
from llavanext.run import write_run_files

# The tiny model's prompt format as a HF chat template: what an exported folder would carry.
VICUNA_JINJA = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the human's questions."
    "{% for m in messages %}{% if m['role'] == 'user' %} USER: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}{% endfor %} ASSISTANT:"
    "{% endif %}{% endfor %}"
)


def make_run(root, overrides=(), lora_noise=False):
    """A run folder as training leaves it: config.yaml + checkpoints/last.ckpt."""
    cfg = compose("finetune", ["model=tiny", "data=demo", *overrides])
    torch.manual_seed(0)
    built = assemble(cfg)
    if lora_noise:  # fresh LoRA is a no-op (B = 0): make it change the answers
        for name, p in built.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    write_run_files(root, cfg)
    (root / "checkpoints").mkdir()
    state = {f"model.{k}": v for k, v in built.model.state_dict().items()}
    torch.save({"state_dict": state}, root / "checkpoints" / "last.ckpt")
    return root, built


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    images = {"red": (90, 60, (200, 30, 30)), "blue": (56, 150, (30, 30, 200)), "green": (120, 120, (30, 160, 40))}
    for name, (w, h, color) in images.items():
        image = Image.new("RGB", (w, h), (10, 10, 10))
        image.paste(Image.new("RGB", (w // 2, h // 2), color), (w // 4, h // 4))
        image.save(root / f"{name}.png")
    (root / "broken.png").write_bytes(b"not a png")
    run_dir, built = make_run(root / "run")
    return root, run_dir, built


@pytest.fixture(scope="module")
def generator(files):
    return load(str(files[1]), device="cpu")


def requests(root, n=None):
    out = [
        Request("What color is the shape?", [root / "red.png"], Sampling(max_new_tokens=10)),
        Request("Say something.", [], Sampling(max_new_tokens=7)),
        Request("Compare <image> with <image>, please.", [root / "blue.png", root / "green.png"],
                Sampling(max_new_tokens=12)),
        Request("What is it?", [root / "green.png"], Sampling(max_new_tokens=5)),
    ]
    return out[:n]


def test_decoder_matches_transformers_generate(files):
    """Greedy and seeded sampling give exactly the tokens of transformers' `generate`."""
    root, _, built = files
    model = built.model.eval()
    from llavanext.generate import RunPrompts

    prompts = RunPrompts(compose("finetune", ["model=tiny", "data=demo"]), built.tokenizer, built.image_token_id, None)
    encoded = prompts.encode("Describe it.", [Image.open(root / "red.png").convert("RGB")])
    batch = {"input_ids": encoded.input_ids[None], "attention_mask": torch.ones_like(encoded.input_ids)[None],
             "pixel_values": encoded.pixel_values[0][None], "image_sizes": torch.tensor([encoded.image_sizes[0]])}
    width = batch["input_ids"].shape[1]
    decoder = Decoder(model)
    settings = [(Sampling(max_new_tokens=12), {"do_sample": False}),
                (Sampling(max_new_tokens=12, temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.3, seed=7),
                 {"do_sample": True, "temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.3})]
    for sampling, hf in settings:
        torch.manual_seed(7)
        reference = model.generate(**batch, max_new_tokens=12, eos_token_id=None, pad_token_id=3, **hf)
        ours = [t[0] for t in decoder.stream(batch, sampling)]
        assert ours == reference[0, width:].tolist(), sampling


def test_batched_greedy_equals_one_at_a_time(files, generator):
    """Left padding, image_sizes and per-row limits: a batch answers exactly as each prompt alone."""
    root = files[0]
    prepared = [generator.prepare(r) for r in requests(root)]
    assert len({len(p.encoded.input_ids) for p in prepared}) == 4  # the batch really pads
    alone = [generator.answer([p])[0] for p in prepared]
    together = generator.answer(prepared)
    assert [(a.text, a.tokens, a.finish) for a in together] == [(a.text, a.tokens, a.finish) for a in alone]
    assert [a.tokens for a in alone if a.finish == "length"] == [p.limit for p, a in zip(prepared, alone)
                                                                 if a.finish == "length"]


def test_lora_run_answers_with_its_adapters(tmp_path, files, generator):
    """A LoRA run is rebuilt with its adapters (then merged): the answer is the adapted model's."""
    root, base = files[0], generator
    run_dir, built = make_run(tmp_path / "lora", ["peft=lora", "parts.language_model=lora"], lora_noise=True)
    generator = load(str(run_dir / "checkpoints" / "last.ckpt"), device="cpu")
    prepared = generator.prepare(Request("What is it?", [root / "red.png"], Sampling(max_new_tokens=8)))
    answer = generator.answer([prepared])[0]
    encoded = prepared.encoded
    reference = built.model.eval().generate(
        input_ids=encoded.input_ids[None], attention_mask=torch.ones_like(encoded.input_ids)[None],
        pixel_values=encoded.pixel_values[0][None], image_sizes=torch.tensor([encoded.image_sizes[0]]),
        max_new_tokens=8, do_sample=False, pad_token_id=3, eos_token_id=2)
    expected = built.tokenizer.decode(reference[0, len(encoded.input_ids):], skip_special_tokens=True).strip()
    assert answer.text == expected
    assert answer.text != base.answer([base.prepare(prepared.request)])[0].text


def hf_folder(tmp_path, built, with_template=True):
    """The run's model saved as a HF folder with a processor, as `llavanext export` / the hub would."""
    from tokenizers.processors import TemplateProcessing
    from transformers import LlavaNextProcessor

    from llavanext.data.images import make_image_processor
    from llavanext.demo.tokenizer import load_demo_tokenizer

    tokenizer = load_demo_tokenizer()  # with a BOS on every text, like Llama's
    tokenizer._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    model_cfg = compose("finetune", ["model=tiny", "data=demo"]).model
    processor = LlavaNextProcessor(image_processor=make_image_processor(model_cfg), tokenizer=tokenizer,
                                   patch_size=model_cfg.vision.patch_size, num_additional_image_tokens=1,  # CLS
                                   vision_feature_select_strategy=model_cfg.vision_feature_select_strategy,
                                   chat_template=VICUNA_JINJA if with_template else None)
    folder = tmp_path / "hf"
    built.model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_hf_folder_answers_like_the_run(tmp_path, files, generator):
    """A HF folder's own chat template and processor give the same tokens, hence the same answers."""
    root, run_dir, built = files
    folder = hf_folder(tmp_path, built)
    from_folder = load(str(folder), device="cpu")
    for request in requests(root):
        a, b = generator.prepare(request), from_folder.prepare(request)
        assert a.encoded.input_ids.tolist() == b.encoded.input_ids.tolist()
        assert a.encoded.image_sizes == b.encoded.image_sizes
        for x, y in zip(a.encoded.pixel_values, b.encoded.pixel_values):
            torch.testing.assert_close(x, y[: len(x)])
    batch = [from_folder.prepare(r) for r in requests(root)]
    assert [a.text for a in from_folder.answer(batch)] == \
        [a.text for a in generator.answer([generator.prepare(r) for r in requests(root)])]


def test_store_names_and_bad_checkpoints(tmp_path, monkeypatch, files):
    root, run_dir, built = files
    store = tmp_path / "home" / "models" / "acme"
    store.mkdir(parents=True)
    hf_folder(store, built).rename(store / "tiny-llava")
    monkeypatch.setenv("LLAVANEXT_HOME", str(tmp_path / "home"))
    generator = load("acme/tiny-llava", device="cpu")
    assert generator.answer([generator.prepare(requests(root, 1)[0])])[0].tokens > 0
    with pytest.raises(CheckpointError, match="no model of that name"):
        load("acme/nothing", device="cpu")
    no_template = hf_folder(tmp_path / "bare", built, with_template=False)
    with pytest.raises(CheckpointError, match="no chat template"):
        load(str(no_template), device="cpu")
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        load(str(run_dir), device="cpu", decode="graph")


def test_bad_requests_name_the_problem(files, generator):
    root = files[0]
    cases = [
        (Request("Hi", [root / "missing.png"]), "image .*missing.png does not exist"),
        (Request("Hi", [root / "broken.png"]), "image .*broken.png cannot be read"),
        (Request("<image> and <image>?", [root / "red.png"]), "2 <image> marker\\(s\\) in the prompt but 1 image\\(s\\) given"),
        (Request("word " * 3000, []), "the prompt is \\d+ tokens \\(0 of them image tokens\\) but the model's "
                                      "context is 2048"),
    ]
    for request, message in cases:
        with pytest.raises(DataError, match=f"^the prompt: {message}"):
            generator.prepare(request)
    with pytest.raises(ConfigError, match="top_p=1.5 must be in"):
        Sampling(top_p=1.5).check()


def test_stop_strings_and_streaming(files, generator):
    """A stop string ends the answer before it; the streamed pieces add up to the answer."""
    root = files[0]
    request = Request("What color is the shape?", [root / "red.png"], Sampling(max_new_tokens=16))
    full = generator.answer([generator.prepare(request)])[0]
    assert full.finish == "length" and len(full.text) > 6
    stop = full.text[3:6]
    request.stop = (stop,)
    pieces = []
    stopped = generator.answer([generator.prepare(request)], on_text=pieces.append)[0]
    assert stopped.finish == "stop"
    assert stopped.text == full.text[: full.text.index(stop)].strip()
    assert "".join(pieces).strip() == stopped.text
    pieces = []
    request.stop = ()
    generator.answer([generator.prepare(request)], on_text=pieces.append)
    assert len(pieces) > 1 and "".join(pieces) == full.text


def test_jsonl_batch_reports_bad_records_and_resumes(tmp_path, files, generator):
    root, run_dir, _ = files
    lines = [
        json.dumps({"id": "a", "prompt": "What color is the shape?", "image": "red.png", "max_new_tokens": 10}),
        json.dumps({"id": "b", "prompt": "Say something.", "max_new_tokens": 7}),
        "{not json",
        json.dumps({"id": "c", "prompt": "Compare <image> with <image>, please.", "images": ["blue.png", "green.png"],
                    "max_new_tokens": 12}),
        json.dumps({"id": "d", "prompt": "Where?", "image": "missing.png"}),
        json.dumps({"id": "e", "prompt": "<image> <image>", "image": "red.png"}),
        json.dumps({"id": "f", "prompt": "Hi", "temprature": 0.3}),
        json.dumps({"id": "g", "prompt": "What is it?", "images": ["green.png"], "max_new_tokens": 5}),
        json.dumps({"id": "h", "prompt": "Hot?", "temperature": 0.9, "seed": 3, "max_new_tokens": 6}),
    ]
    source = tmp_path / "questions.jsonl"
    source.write_text("\n".join(lines) + "\n")
    (tmp_path / "red.png").write_bytes((root / "red.png").read_bytes())
    for name in ("blue", "green"):
        (tmp_path / f"{name}.png").write_bytes((root / f"{name}.png").read_bytes())
    target = tmp_path / "out" / "answers.jsonl"
    cfg = compose("generate", [f"checkpoint={run_dir}", f"input={source}", f"output={target}", "batch_size=3", "device=cpu"])
    run(cfg)
    records = [json.loads(line) for line in target.read_text().splitlines()]
    by_id = {r["id"]: r for r in records if r["id"] is not None}
    assert sorted(by_id) == list("abcdefgh")
    assert {k for k, r in by_id.items() if "answer" in r} == {"a", "b", "c", "g", "h"}
    assert [r for r in records if r["id"] is None] == [
        {"id": None, "line": 3, "error": f"{source}:3: not JSON (Expecting property name enclosed in double quotes)"}]
    assert "missing.png does not exist" in by_id["d"]["error"] and "line 5" in by_id["d"]["error"]
    assert "2 <image> marker(s) in the prompt but 1 image(s) given" in by_id["e"]["error"]
    assert "unknown key(s) temprature" in by_id["f"]["error"]
    # the same answers as asking one at a time
    single = requests(root)
    for rid, request in zip("abcg", single):
        assert by_id[rid]["answer"] == generator.answer([generator.prepare(request)])[0].text

    # a crash mid-line, then a rerun: only the unanswered ids are tried again
    target.write_text("\n".join(json.dumps(r) for r in records if r["id"] != "g") + '\n{"id": "x", "ans')
    run(cfg)
    again = [json.loads(line) for line in target.read_text().splitlines()[len(records):]]
    assert [r["id"] for r in again if "answer" in r] == ["g"]
    assert by_id["g"]["answer"] == [r for r in again if r["id"] == "g"][0]["answer"]


def test_cli_answers_from_a_run_folder(files, generator, capsys):
    """`llavanext generate checkpoint=<run> image=... prompt=...` prints what the library answers."""
    root, run_dir, _ = files
    prompt = "What's this, a shape?"  # a quote and a comma: free text needs no Hydra quoting
    base = ["generate", f"checkpoint={run_dir}", "max_new_tokens=9", f"hydra.run.dir={root / 'cli'}"]
    done = subprocess.run([sys.executable, "-m", "llavanext", *base, f"image={root / 'red.png'}", f"prompt={prompt}"],
                          capture_output=True, text=True, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)
    assert done.returncode == 0, done.stderr
    expected = generator.answer([generator.prepare(Request(prompt, [root / "red.png"], Sampling(max_new_tokens=9)))])
    assert done.stdout.strip() == expected[0].text

    from llavanext.cli.main import main

    with pytest.raises(SystemExit) as bad:
        main([*base, f"image={root / 'missing.png'}", "prompt=Hi"])
    assert bad.value.code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"llavanext: the prompt: image {root / 'missing.png'} does not exist"]


def test_demo_scores_through_generate(tmp_path, monkeypatch):
    """The demo's evaluation answers exactly what `llavanext generate input=...` answers."""
    from llavanext.demo.evaluate import answer_all
    from llavanext.demo.shapes import ensure_dataset

    monkeypatch.setenv("LLAVANEXT_HOME", str(tmp_path / "home"))
    run_dir, _ = make_run(tmp_path / "run", ["data.num_train=4", "data.num_val=6"])
    results = answer_all(run_dir, batch_size=4)
    root = ensure_dataset(4, 6, 0)
    val = json.loads((root / "val.json").read_text())
    source = tmp_path / "val.jsonl"
    source.write_text("".join(json.dumps({"id": r["id"], "prompt": r["conversations"][0]["value"],
                                          "image": r["image"], "max_new_tokens": 6}) + "\n" for r in val))
    target = tmp_path / "answers.jsonl"
    run(compose("generate", [f"checkpoint={run_dir}", f"input={source}", f"output={target}",
                             f"image_root={root}", "device=cpu"]))
    answers = {r["id"]: r["answer"] for r in map(json.loads, target.read_text().splitlines())}
    assert [r["answer"] for r in results] == [answers[r["id"]] for r in val]
    assert [r["truth"] for r in results] == [r["conversations"][1]["value"] for r in val]
