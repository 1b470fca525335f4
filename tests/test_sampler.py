"""The resumable sampler: disjoint rank shards, a new order per epoch, and exact skipping on resume."""

import pytest
import torch

from llavanext.data.sampler import ResumableSampler


def shards(size, world, seed=3, epoch=0, consumed=0):
    out = []
    for rank in range(world):
        s = ResumableSampler(size, seed=seed, rank=rank, world_size=world)
        s.load_state_dict({"seed": seed, "epoch": epoch, "consumed": consumed})
        out.append(list(s))
    return out


@pytest.mark.parametrize("size,world", [(10, 1), (10, 3), (64, 4), (7, 2)])
def test_ranks_read_disjoint_shards_of_one_permutation(size, world):
    parts = shards(size, world)
    flat = [i for p in parts for i in p]
    assert len(flat) == len(set(flat)), "a sample was read twice in one epoch"
    assert all(len(p) == size // world for p in parts), "ranks must take the same number of steps"
    assert set(flat) <= set(range(size))
    assert len(flat) == size - size % world


def test_each_epoch_is_a_new_seeded_order():
    s = ResumableSampler(50, seed=1)
    first = list(s)
    assert list(s) == first  # the same epoch replays identically
    s.set_epoch(1)
    assert sorted(list(s)) == sorted(first) and list(s) != first
    assert list(ResumableSampler(50, seed=2)) != first


@pytest.mark.parametrize("world", [1, 2, 4])
def test_resume_skips_exactly_what_was_consumed(world):
    whole = shards(48, world, epoch=2)
    consumed = 8 * world  # 8 samples per rank were trained on
    resumed = shards(48, world, epoch=2, consumed=consumed)
    assert resumed == [p[8:] for p in whole]


def test_resume_on_another_world_size_reads_the_rest_of_the_permutation():
    before = shards(48, 4)  # 4 ranks read 6 samples each, then the job comes back on 2 ranks
    seen = {i for p in before for i in p[:6]}
    after = shards(48, 2, consumed=24)
    rest = [i for p in after for i in p]
    assert not seen & set(rest) and len(seen) + len(rest) == 48


def test_a_new_epoch_after_resume_starts_from_its_beginning():
    s = ResumableSampler(20, seed=0)
    s.load_state_dict({"seed": 0, "epoch": 0, "consumed": 12})
    assert len(list(s)) == 8
    s.set_epoch(1)
    fresh = ResumableSampler(20, seed=0)
    fresh.set_epoch(1)
    assert list(s) == list(fresh) and len(s) == 20


def test_order_matches_torch_randperm_with_the_epoch_seed():
    s = ResumableSampler(30, seed=5)
    s.set_epoch(4)
    assert list(s) == torch.randperm(30, generator=torch.Generator().manual_seed(9)).tolist()
