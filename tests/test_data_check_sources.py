"""`llavanext data check` beyond LLaVA JSON: a prepared energon folder reports what the JSON did
(plus damage inside its shards, by id and shard/key), a mix reports each source, mock has nothing."""

import io
import json
import re
import tarfile
from dataclasses import replace

import pytest
from datakit import image, toy_records, write_llava
from omegaconf import open_dict
from rich.console import Console

from llavanext.cli.overrides import compose
from llavanext.data import check
from llavanext.data.sources import read_records
from llavanext.errors import DataError

pytest.importorskip("megatron.energon")

Q, A = {"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "red"}
# content problems (kept by `data prepare`) with the reason's words; seq_length 80 drops the big image
BAD = {
    "two-markers-one-image": ({"image": "small.png", "conversations": [
        {"from": "human", "value": "<image>\n<image>\nSame?"}, A]}, "2 <image> marker(s) but 1 image(s)"),
    "empty": ({"conversations": []}, "empty conversation"),
    "one-sided": ({"image": "small.png", "conversations": [Q]}, "without an assistant answer"),
    "unknown-role": ({"image": "small.png", "conversations": [Q, {"from": "bot", "value": "red"}]},
                     "unknown role 'bot'"),
    "non-utf8": ({"conversations": [{"from": "human", "value": "NONUTF8"}, A]}, "non-UTF-8"),
    "too-long": ({"image": "big.png", "conversations": [Q, A]}, "do not fit seq_length=80"),
    "missing-image": ({"image": "nowhere.png", "conversations": [Q, A]}, "does not exist"),  # left out by prepare
}
COMMON = ["data.seq_length=80", "data.max_bad_fraction=0.9", "workers=2", "show=100"]


def write_bad_set(root):
    """Two good records before each bad one: 21 records, 7 bad."""
    root.mkdir(parents=True, exist_ok=True)
    image(20, 20).save(root / "small.png")
    image(40, 30, seed=1).save(root / "wide.png")
    image(200, 200).save(root / "big.png")
    records = []
    for i, (rid, (record, _)) in enumerate(BAD.items()):
        for k in range(2):
            records.append({"id": f"good-{i}-{k}", "image": ["small.png", "wide.png"][k],
                            "conversations": [Q, {"from": "gpt", "value": ["red", "two red circles"][k]}]})
        records.append({"id": rid} | record)
    raw = json.dumps(records).replace("NONUTF8", "caf__E9__").encode().replace(b"__E9__", b"\xe9")
    (root / "data.json").write_bytes(raw)
    return root / "data.json"


def damage(shard, how: str) -> tuple[str, str]:
    """Rewrite a shard with its first good sample damaged (`corrupt`, `missing` image or garbage `json`);
    (the id a check reports it by, its id in the JSON)."""
    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    meta = {n.split(".")[0]: json.loads(d.decode(errors="replace")) for n, d in members if n.endswith(".json")}
    key, rid = next((k, m["id"]) for k, m in meta.items() if m["id"].startswith("good"))
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            if name == f"{key}.img0.png" and how == "missing":
                continue
            if name == f"{key}.img0.png" and how == "corrupt":
                data = b"\x89PNG\r\n\x1a\n this is not an image"
            if name == f"{key}.json" and how == "json":
                data = b"{not json"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return (key if how == "json" else rid), rid


@pytest.fixture(scope="module")
def bad_json(tmp_path_factory):
    return write_bad_set(tmp_path_factory.mktemp("bad") / "set")


@pytest.fixture(scope="module")
def prepared(bad_json):
    """`data prepare`'s own writer and indexer, three train shards damaged in between."""
    from llavanext.data.prepare import energon_prepare, write_shards

    out = bad_json.parent / "wds"
    counts, left_out = write_shards(read_records(bad_json), bad_json.parent, out, shard_size=4, val_fraction=0.25)
    assert [rid for rid, _ in left_out] == ["missing-image"] and counts["val"] > 0
    damaged = {}  # reported id -> (shard, reason's words)
    for n, (how, words) in enumerate([("corrupt", "image img0.png cannot be read"),
                                      ("missing", "image img0.png is missing from the shard"),
                                      ("json", "unreadable .json")]):
        reported, original = damage(out / "shards" / f"train-{n:06d}.tar", how)
        damaged[reported] = (f"shards/train-{n:06d}.tar", words)
        damaged[original] = damaged[reported]  # the JSON check's row of that record is not compared
    energon_prepare(out, ["train", "val"])
    return out, damaged


def run_check(overrides, capsys, monkeypatch):
    monkeypatch.setattr(check, "console", Console(width=400))
    rows = check.run(compose("data_check", overrides))
    return rows, capsys.readouterr().out


def shard_ids(shard) -> list[str]:
    with tarfile.open(shard) as tar:
        return [json.loads(tar.extractfile(m).read().decode(errors="replace"))["id"] for m in tar
                if m.name.endswith(".json")]


def test_energon_check_reports_what_the_json_check_does(bad_json, prepared, capsys, monkeypatch):
    out, damaged = prepared
    json_rows, _ = run_check(["data=llava_json", f"data.path={bad_json}", *COMMON], capsys, monkeypatch)
    rows, text = run_check(["data=energon", f"data.path={out}", *COMMON], capsys, monkeypatch)

    # only the train split is read
    val = {rid for shard in (out / "shards").glob("val-*.tar") for rid in shard_ids(shard)}
    assert val and not val & {r.id for r in rows}
    # every sample of the train shards, undamaged ones exactly as the JSON check measured them
    kept = [r for r in json_rows if r.id not in val and r.id != "missing-image"]
    assert [r.id for r in rows if r.id not in damaged] == [r.id for r in kept if r.id not in damaged]
    assert [replace(r, where="") for r in rows if r.id not in damaged] == [r for r in kept if r.id not in damaged]
    assert {r.id for r in rows if r.reason} - set(damaged) == set(BAD) - val - {"missing-image"}
    # damage inside a shard: the record's id (its key when the .json is unreadable), shard/key and reason
    by_id = {r.id: r for r in rows}
    for rid, (shard, words) in damaged.items():
        if rid not in by_id:  # the record whose .json was damaged: reported by its key
            continue
        assert words in by_id[rid].reason and by_id[rid].where.startswith(f"{shard}/"), by_id[rid]
        assert any(rid in line and shard in line and words in line for line in text.splitlines()), rid
    for rid in set(BAD) - val - {"missing-image"}:
        assert any(rid in line and BAD[rid][1] in line for line in text.splitlines()), rid
    assert "(train split)" in text and re.search(r"one sample\S* \(id good-", text)


def test_energon_check_limit_reads_only_the_first_records(prepared, capsys, monkeypatch):
    out, _ = prepared
    rows, _ = run_check(["data=energon", f"data.path={out}", *COMMON, "limit=5", "workers=1"], capsys, monkeypatch)
    assert len(rows) == 5


def test_mix_reports_each_source_and_fails_over_the_limit(bad_json, tmp_path, capsys, monkeypatch):
    records, images = toy_records(8)
    clean = write_llava(tmp_path, records, images)
    sources = [{"source": "llava_json", "path": str(clean)}, {"source": "llava_json", "path": str(bad_json)}]
    cfg = compose("data_check", ["data=mix", "data.max_bad_fraction=0.5", "workers=1"])
    with open_dict(cfg):
        cfg.data.sources = sources
    monkeypatch.setattr(check, "console", Console(width=400))
    rows = check.run(cfg)
    text = capsys.readouterr().out
    assert len(rows) == 8 + 21 and text.count("one sample") == 2
    assert f"data check: data.sources[0]: {clean}" in text and f"data check: data.sources[1]: {bad_json}" in text
    with open_dict(cfg):
        cfg.data.max_bad_fraction = 0.1
    with pytest.raises(DataError, match=r"^data.sources\[1\]: 6 of 21 records are bad") as failed:
        check.run(cfg)
    assert "data.sources[0]" not in str(failed.value)  # the clean source passes
    assert "data.sources[0]" in capsys.readouterr().out  # and is still reported


def test_mock_has_nothing_to_check(tmp_path, capsys, monkeypatch):
    rows, text = run_check(["data=mock", "model.tokenizer=null"], capsys, monkeypatch)
    assert rows == [] and "data=mock is synthetic" in text and "nothing to check" in text
    records, images = toy_records(4)
    cfg = compose("data_check", ["data=mix", "workers=1"])
    with open_dict(cfg):
        cfg.data.sources = [{"source": "mock"}, {"source": "llava_json", "path": str(write_llava(tmp_path, records,
                                                                                                   images))}]
    rows = check.run(cfg)
    text = capsys.readouterr().out
    assert len(rows) == 4 and "data.sources[0]: data=mock is synthetic" in text
