"""Bad data: every kind is caught with its reason, skipped without crashing a worker or touching
other samples' labels, counted against data.max_bad_fraction, and listed by `llavanext data check`."""

import json
import re
import subprocess
import sys

import pytest
import torch
from datakit import encoder, image, model_cfg, tokenizer
from omegaconf import OmegaConf

from llavanext.cli.overrides import compose
from llavanext.data import check
from llavanext.data.datamodule import DataModule
from llavanext.data.sources import LlavaJsonDataset, read_records
from llavanext.errors import DataError

Q, A = {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}
# id -> (record, the reason's words); seq_length 80 leaves no room for the big image's 88 tokens
BAD = {
    "missing-image": ({"image": "nowhere.png", "conversations": [Q, A]}, "does not exist"),
    "corrupt-image": ({"image": "corrupt.png", "conversations": [Q, A]}, "cannot be read"),
    "two-markers-one-image": ({"image": "small.png", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, A]}, "2 <image> marker(s) but 1 image(s)"),
    "empty": ({"conversations": []}, "empty conversation"),
    "one-sided": ({"image": "small.png", "conversations": [Q]}, "without an assistant answer"),
    "unknown-role": ({"image": "small.png", "conversations": [Q, {"from": "bot", "value": "red"}]},
                     "unknown role 'bot'"),
    "non-utf8": ({"conversations": [{"from": "human", "value": "NONUTF8"}, A]}, "non-UTF-8"),
    "too-long": ({"image": "big.png", "conversations": [Q, A]}, "do not fit seq_length=80"),
}
GOOD = [{"id": f"good-{i}", "image": "small.png", "conversations": [Q, {"from": "gpt", "value": c}]}
        for i, c in enumerate(["red", "blue", "green", "two red circles"])]


@pytest.fixture()
def bad_set(tmp_path):
    image(20, 20).save(tmp_path / "small.png")
    image(200, 200).save(tmp_path / "big.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    records = []
    for i, (rid, (record, _)) in enumerate(BAD.items()):
        records += [GOOD[i % len(GOOD)] | {"id": f"good-{i}"}, {"id": rid} | record]
    raw = json.dumps(records).replace("NONUTF8", "caf__E9__").encode().replace(b"__E9__", b"\xe9")
    (tmp_path / "data.json").write_bytes(raw)
    return tmp_path


def test_every_bad_kind_is_caught_with_its_reason(bad_set):
    ds = LlavaJsonDataset(read_records(bad_set / "data.json"), bad_set, encoder(seq_length=80), "data.json")
    for i in range(len(ds)):
        rid = ds.records[i]["id"]
        if rid in BAD:
            with pytest.raises(DataError, match=re.escape(BAD[rid][1])) as caught:
                ds[i]
            assert f"data.json record '{rid}'" in str(caught.value)
        else:
            assert len(ds[i].input_ids) <= 80


def datamodule(path, **over):
    tok = tokenizer()
    cfg = dict(name="llava_json", source="llava_json", path=str(path / "data.json"), image_root=str(path),
               seq_length=80, micro_batch_size=2, num_workers=2, on_bad_sample="skip", max_bad_fraction=0.6,
               packing=False) | over
    dm = DataModule(OmegaConf.create(cfg), model_cfg(), tok, "vicuna_v1", tok.convert_tokens_to_ids("<image>"), 512)
    dm.setup()
    return dm


def test_bad_samples_are_skipped_in_workers_and_labels_are_untouched(bad_set):
    dm = datamodule(bad_set)
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.loader(dm.train_set, shuffle=False)]
    assert dm.counters.bad == len(BAD) and dm.counters.seen == len(dm.train_set)
    # every good record is trained once in the epoch (a bad slot's stand-in is dropped again),
    # encoded exactly as on its own
    direct = {tuple(dm.train_set[i].input_ids.tolist()): dm.train_set[i].labels
              for i in range(len(dm.train_set)) if dm.train_set.records[i]["id"].startswith("good")}
    trained = []
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"], batch["labels"], batch["attention_mask"]):
            n = int(mask.sum())
            assert torch.equal(direct[tuple(ids[:n].tolist())], labels[:n])
            trained.append(tuple(ids[:n].tolist()))
    goods = [tuple(dm.train_set[i].input_ids.tolist()) for i in range(len(dm.train_set))
             if dm.train_set.records[i]["id"].startswith("good")]
    assert sorted(trained) == sorted(goods)


def test_a_micro_batch_of_only_bad_records_still_trains_one_sample(bad_set):
    """Every rank must take a step: a wholly bad micro-batch keeps the next good record."""
    dm = datamodule(bad_set, micro_batch_size=1, num_workers=0)
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.loader(dm.train_set, shuffle=False)]
    assert all(b["input_ids"].shape[0] == 1 for b in batches) and len(batches) == len(dm.train_set)
    assert dm.counters.bad == len(BAD)


def test_bad_fraction_over_the_limit_fails_the_run(bad_set):
    dm = datamodule(bad_set, max_bad_fraction=0.2, num_workers=0)
    with pytest.raises(DataError, match="max_bad_fraction=0.2"):
        for batch in dm.loader(dm.train_set, shuffle=False):
            dm.on_before_batch_transfer(batch, 0)
    dm = datamodule(bad_set, on_bad_sample="error", num_workers=0)
    with pytest.raises(DataError, match="on_bad_sample=error.*record 'missing-image'"):
        for batch in dm.loader(dm.train_set, shuffle=False):
            dm.on_before_batch_transfer(batch, 0)


def test_data_check_reports_every_bad_record(bad_set, capsys, monkeypatch):
    from rich.console import Console

    monkeypatch.setattr(check, "console", Console(width=400))
    cfg = compose("data_check", ["data=llava_json", f"data.path={bad_set / 'data.json'}", "data.seq_length=80",
                                 "data.max_bad_fraction=0.6", "workers=2", "show=50"])
    rows = check.run(cfg)
    out = capsys.readouterr().out
    assert {r.id for r in rows if r.reason} == set(BAD)
    for rid, (_, reason) in BAD.items():
        if rid == "corrupt-image":  # found from the header alone
            reason = "cannot be read"
        assert any(rid in line and reason in line for line in out.splitlines()), rid
    assert "too long (dropped)" in out and "one sample" in out
    rows_by_id = {r.id: r for r in rows}
    assert rows_by_id["too-long"].too_long and rows_by_id["good-0"].image_tokens > 0


def test_data_check_exits_non_zero_over_the_limit(bad_set):
    done = subprocess.run([sys.executable, "-m", "llavanext", "data", "check", "data=llava_json",
                           f"data.path={bad_set / 'data.json'}", "data.seq_length=80", "data.max_bad_fraction=0.1",
                           f"hydra.run.dir={bad_set / 'run'}"], capture_output=True, text=True)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "8 of 16 records are bad" in done.stderr
    assert "missing-image" in done.stdout


def test_energon_reports_the_same_reasons_as_json(bad_set):
    """Through `data prepare` and energon's loader: records with missing or unreadable images are left out by
    prepare (and listed); every other bad kind reaches training and is skipped with the JSON source's reason."""
    pytest.importorskip("megatron.energon")
    from llavanext.data.energon import energon_loader
    from llavanext.data.prepare import energon_prepare, write_shards

    out = bad_set / "wds"
    _, left_out = write_shards(read_records(bad_set / "data.json"), bad_set, out, shard_size=4, val_fraction=0.0)
    assert {rid for rid, _ in left_out} == {"missing-image", "corrupt-image"}
    energon_prepare(out, ["train"])
    cfg = OmegaConf.create(dict(path=str(out), num_workers=0, micro_batch_size=1, shuffle_buffer_size=None,
                                max_samples_per_sequence=None, repeat=True))
    # a skipped record is reported with the next batch, so read on into the second pass (as training does)
    loader = iter(energon_loader(cfg, encoder(seq_length=80), lambda s: s, "train"))
    reported = [line for _ in range(2 * len(GOOD) * 2) for sample in next(loader) for line in sample.bad]
    expected = {rid: reason for rid, (_, reason) in BAD.items() if rid not in ("missing-image", "corrupt-image")}
    for rid, reason in expected.items():
        assert any(f"record '{rid}'" in line and reason in line for line in reported), (rid, reported)
