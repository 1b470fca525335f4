"""Sources: the same records through llava_json, energon (after data prepare) and hf encode the same;
JSONL, mixing, and energon's data position across a restore."""

import json

import pytest
import torch
from datakit import encoder, model_cfg, tokenizer, toy_records, write_llava
from omegaconf import OmegaConf

from llavanext.data.datamodule import DataModule, Guard
from llavanext.data.sources import HFDataset, LlavaJsonDataset, MixDataset, load_hf, read_records

pytest.importorskip("megatron.energon")


def key(sample):
    return (tuple(sample.input_ids.tolist()), tuple(sample.labels.tolist()),
            tuple(round(float(p.sum()), 3) for p in sample.pixel_values), tuple(sample.image_sizes))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    records, images = toy_records(12)
    return root, records, write_llava(root, records, images)


@pytest.fixture(scope="module")
def prepared(toy):
    from llavanext.data.prepare import energon_prepare, write_shards

    root, records, path = toy
    out = root / "wds"
    counts, bad = write_shards(read_records(path), root, out, shard_size=5, val_fraction=0.25)
    assert bad == [] and counts == {"train": 9, "val": 3}
    energon_prepare(out, ["train", "val"])
    return out


def energon_samples(path, split="train"):
    from llavanext.data.energon import energon_loader

    cfg = OmegaConf.create(dict(path=str(path), num_workers=0, micro_batch_size=1, shuffle_buffer_size=None,
                                max_samples_per_sequence=None, repeat=False))
    return [s for batch in energon_loader(cfg, encoder(), lambda samples: samples, split) for s in batch]


def hf_parquet(root, records):
    import datasets

    rows = {"id": [], "conversations": [], "images": []}
    for r in records:
        names = [r["image"]] if isinstance(r.get("image"), str) else r.get("image", [])
        rows["id"].append(r["id"])
        rows["conversations"].append(r["conversations"])
        rows["images"].append([{"bytes": (root / n).read_bytes(), "path": n} for n in names])
    features = datasets.Features({
        "id": datasets.Value("string"),
        "conversations": datasets.List({"from": datasets.Value("string"), "value": datasets.Value("string")}),
        "images": datasets.List(datasets.Image())})
    path = root / "hf" / "train.parquet"
    path.parent.mkdir(exist_ok=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    return path.parent


def test_same_records_encode_the_same_through_every_source(toy, prepared):
    root, records, path = toy
    enc = encoder()
    llava = [LlavaJsonDataset(read_records(path), root, enc, str(path))[i] for i in range(len(records))]
    hf = HFDataset(load_hf(str(hf_parquet(root, records))), enc, root, "hf")
    assert [key(s) for s in llava] == [key(hf[i]) for i in range(len(records))]
    energon = energon_samples(prepared) + energon_samples(prepared, "val")
    assert sorted(key(s) for s in energon) == sorted(key(s) for s in llava)
    # several images, none, and multi-turn are all in the toy set
    assert {len(s.pixel_values) for s in llava} == {0, 1, 2}


def test_jsonl_reads_like_json(toy, tmp_path):
    root, records, path = toy
    lines = tmp_path / "data.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert read_records(lines) == read_records(path)


def test_mix_follows_weights_and_cycles_small_sources():
    a, b = list(range(10)), list(range(100, 104))
    mix = MixDataset([a, b], [3, 1], seed=0, length=400)
    picked = [mix[i] for i in range(len(mix))]
    from_b = [x for x in picked if x >= 100]
    assert 70 <= len(from_b) <= 130  # a quarter of 400
    assert sorted(set(from_b)) == b and max(from_b.count(x) for x in b) - min(from_b.count(x) for x in b) <= 1
    assert [MixDataset([a, b], [3, 1], seed=0, length=400)[i] for i in range(400)] == picked


def datamodule(cfg):
    tok = tokenizer()
    return DataModule(OmegaConf.create(cfg), model_cfg(), tok, "vicuna_v1", tok.convert_tokens_to_ids("<image>"), 512)


def test_energon_resume_continues_with_the_next_unseen_batch(prepared, tmp_path):
    cfg = dict(name="energon", source="energon", path=str(prepared), seq_length=2048, micro_batch_size=2,
               num_workers=0, shuffle_buffer_size=None, max_samples_per_sequence=None, repeat=True,
               on_bad_sample="skip", max_bad_fraction=0.1, packing=False)
    first = datamodule(cfg)
    it = iter(first.train_dataloader())
    for _ in range(3):
        next(it)
    torch.save(first.energon_state(), tmp_path / "data.pt")
    expected = [next(it)["input_ids"] for _ in range(4)]
    second = datamodule(cfg)
    second.restore_energon_state(torch.load(tmp_path / "data.pt", weights_only=False))
    it = iter(second.train_dataloader())
    got = [next(it)["input_ids"] for _ in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    fresh = [b["input_ids"] for _, b in zip(range(4), datamodule(cfg).train_dataloader())]
    assert not all(a.shape == b.shape and torch.equal(a, b) for a, b in zip(fresh, expected))


def test_datamodule_packs_llava_json(toy):
    root, records, path = toy
    dm = datamodule(dict(name="llava_json", source="llava_json", path=str(path), image_root=str(root), seq_length=2048,
                         micro_batch_size=4, num_workers=0, on_bad_sample="skip", max_bad_fraction=0.1,
                         packing=True, pack_length=None))
    dm.setup()
    batch = next(iter(dm.loader(dm.train_set, shuffle=False)))
    batch = dm.on_before_batch_transfer(batch, 0)
    assert set(batch) == {"input_ids", "position_ids", "labels", "pixel_values", "image_sizes"}
    assert batch["input_ids"].shape[0] == 1 and int((batch["position_ids"] == 0).sum()) == 4
    assert dm.counters.seen == 4 and dm.counters.bad == 0
    assert isinstance(dm.loader(dm.train_set, shuffle=False).dataset, Guard)


def test_a_resumed_energon_run_reads_the_next_unseen_batch(prepared, tmp_path):
    """Through Lightning's checkpoints: resumed steps see the batches the unbroken run saw (no
    restart from the first sample, no batch skipped by Lightning's fetch-ahead)."""
    from test_resume import losses

    from conftest import compose
    from llavanext import train

    common = ["data=energon", f"data.path={prepared}", "data.num_workers=0", "data.micro_batch_size=1",
              "data.shuffle_buffer_size=null", "data.max_samples_per_sequence=null", "data.val=false",
              "trainer.progress_bar=none", "trainer.print_every=0", "trainer.log_every_n_steps=1",
              "trainer.checkpoint_every=3", "optim.warmup_steps=1", "optim.lr=1e-3", "optim.min_lr=1e-3"]
    unbroken = train.run(compose("finetune", [*common, "trainer.max_steps=7"], run_dir=tmp_path / "unbroken"))
    broken = tmp_path / "broken"
    train.run(compose("finetune", [*common, "trainer.max_steps=3"], run_dir=broken))
    train.run(compose("finetune", [*common, "trainer.max_steps=7", "resume=auto"], run_dir=broken))
    expected, got = losses(unbroken), losses(broken)
    assert sorted(got) == list(range(1, 8))
    assert [got[s] for s in range(4, 8)] == pytest.approx([expected[s] for s in range(4, 8)], abs=1e-6)
