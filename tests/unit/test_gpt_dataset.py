"""Samples, splits, shuffling, the on-disk index cache, blending and the distributed sampler."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from megamod.data.blend import blend_indices
from megamod.data.gpt_dataset import (DistributedBatchSampler, build_datasets, collate,
                                      parse_data_paths, parse_split, split_documents)
from megamod.data.indexed import IndexedDataset, IndexedDatasetBuilder

SEQ = 8


def make_dataset(path, lengths, base=0) -> str:
    """Document k holds tokens base + 1000·k + (0, 1, 2, ...): any token tells its document."""
    with IndexedDatasetBuilder(str(path), np.int32) as b:
        for k, n in enumerate(lengths):
            b.add_document(base + 1000 * k + np.arange(n))
        b.finalize()
    return str(path)


def doc_of(token) -> int:
    return int(token) % 1_000_000 // 1000


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 40, 50)
    lengths[[3, 4, 17]] = 0  # empty documents are legal and must be stepped over
    return make_dataset(tmp_path / "d", lengths)


def test_samples_are_windows_of_the_epoch_stream(data, tmp_path):
    train, _ = build_datasets([data], [1.0], SEQ, seed=1, split="100,0,0", num_samples=(300, 0),
                              cache_dir=str(tmp_path / "c"))
    ds = IndexedDataset(data)
    stream = np.concatenate([ds[int(i)] for i in train.index.doc_idx]).astype(np.int64)
    assert len(train) >= 300
    for i in range(len(train)):
        j = int(train.index.shuffle_idx[i])
        sample = train[i]
        assert sample.dtype == np.int64 and sample.shape == (SEQ + 1,)
        assert np.array_equal(sample, stream[j * SEQ: j * SEQ + SEQ + 1])


def test_every_sequence_visited_once_per_epoch(data, tmp_path):
    train, _ = build_datasets([data], [1.0], SEQ, 1, "100,0,0", (300, 0))
    ds = IndexedDataset(data)
    nonempty = set(np.flatnonzero(ds.sizes > 0))
    epoch_tokens = ds.num_tokens
    first_epoch = [i for i in range(len(train)) if train.index.shuffle_idx[i] * SEQ < epoch_tokens]
    assert first_epoch == list(range(len(first_epoch)))  # epoch 0's samples come first...
    seen = {doc_of(t) for i in first_epoch for t in train[i][:-1]}
    assert seen == nonempty  # ...and cover every non-empty document
    assert train.epochs > 1 and len(train.index.doc_idx) > len(ds)


def test_split_by_documents_is_disjoint(data, tmp_path):
    train, valid = build_datasets([data], [1.0], SEQ, 1, "80,20,0", (200, 50))
    assert split_documents(50, parse_split("80,20,0")) == [(0, 40), (40, 50), (50, 50)]
    train_docs = {doc_of(t) for i in range(len(train)) for t in train[i]}
    valid_docs = {doc_of(t) for i in range(len(valid)) for t in valid[i]}
    assert train_docs <= set(range(40)) and valid_docs <= set(range(40, 50))
    assert len(valid) >= 50


def test_seed_controls_order(data):
    a, _ = build_datasets([data], [1.0], SEQ, 1, "100,0,0", (100, 0))
    b, _ = build_datasets([data], [1.0], SEQ, 1, "100,0,0", (100, 0))
    c, _ = build_datasets([data], [1.0], SEQ, 2, "100,0,0", (100, 0))
    assert all(np.array_equal(a[i], b[i]) for i in range(100))
    assert not all(np.array_equal(a[i], c[i]) for i in range(100))


def test_more_samples_extend_the_order_without_changing_it(data):
    # A longer (or resumed, extended) run must see the same first samples in the same order.
    short, _ = build_datasets([data], [1.0], SEQ, 3, "100,0,0", (50, 0))
    long, _ = build_datasets([data], [1.0], SEQ, 3, "100,0,0", (2000, 0))
    assert long.epochs > short.epochs
    assert all(np.array_equal(short[i], long[i]) for i in range(len(short)))


def test_index_cache_reused_and_rebuilt(data, tmp_path):
    cache = tmp_path / "cache"
    args = ([data], [1.0], SEQ, 1, "90,10,0", (100, 10))
    first, _ = build_datasets(*args, cache_dir=str(cache))
    assert not first.index.cache_hit and len(os.listdir(cache)) == 8  # 2 splits × (3 arrays + json)
    again, valid = build_datasets(*args, cache_dir=str(cache))
    assert again.index.cache_hit and valid.index.cache_hit
    assert np.array_equal(again.index.shuffle_idx, first.index.shuffle_idx)

    other_seed, _ = build_datasets([data], [1.0], SEQ, 9, "90,10,0", (100, 10), cache_dir=str(cache))
    assert not other_seed.index.cache_hit

    make_dataset(data, [30] * 50)  # same prefix, different data: the cache must not be trusted
    rebuilt, _ = build_datasets(*args, cache_dir=str(cache))
    assert not rebuilt.index.cache_hit
    assert rebuilt[0].shape == (SEQ + 1,)

    # A damaged cache file is rebuilt, not trusted and not a crash.
    npy = rebuilt.index.cache_prefix + "-sample_idx.npy"
    with open(npy, "r+b") as f:
        f.truncate(100)
    repaired, _ = build_datasets(*args, cache_dir=str(cache))
    assert not repaired.index.cache_hit
    assert np.array_equal(repaired.index.sample_idx, rebuilt.index.sample_idx)


def test_default_cache_lives_next_to_the_data(data, tmp_path):
    t, _ = build_datasets([data], [1.0], SEQ, 1, "100,0,0", (10, 0))
    assert os.path.dirname(t.index.cache_prefix) == str(tmp_path / "index-cache")


def test_blend_mixture_is_within_one_percent(tmp_path):
    a = make_dataset(tmp_path / "a", [50] * 20, base=0)
    b = make_dataset(tmp_path / "b", [30] * 10, base=1_000_000)
    c = make_dataset(tmp_path / "c", [70] * 5, base=2_000_000)
    paths, weights = parse_data_paths(["0.5", a, "0.3", b, "0.2", c])
    train, _ = build_datasets(paths, weights, SEQ, 1, "100,0,0", (100_000, 0))
    assert len(train) == 100_000
    source = np.array([int(train[i][0]) // 1_000_000 for i in range(0, 100_000, 7)])
    observed = np.bincount(source, minlength=3) / len(source)
    assert np.abs(observed - [0.5, 0.3, 0.2]).max() < 0.01
    # Exact at every prefix, not only on average:
    for n in (10, 1000, 100_000):
        counts = np.bincount(train.which[:n], minlength=3)
        assert np.abs(counts - n * np.array(weights)).max() <= 2


def test_blend_prefix_stable():
    w1, s1 = blend_indices([0.7, 0.3], 1000)
    w2, s2 = blend_indices([0.7, 0.3], 5000)
    assert np.array_equal(w1, w2[:1000]) and np.array_equal(s1, s2[:1000])
    with pytest.raises(ValueError):
        blend_indices([0.5, 0.0], 10)


@pytest.mark.parametrize("global_batch", [8, 12])
def test_same_order_for_any_dp_size(data, tmp_path, global_batch):
    other = make_dataset(tmp_path / "other", [25] * 30, base=1_000_000)
    train, _ = build_datasets([data, other], [0.6, 0.4], SEQ, 5, "100,0,0", (120, 0))
    reference = None
    for dp in (1, 2, 4):
        if global_batch % dp:
            continue
        loaders = [torch.utils.data.DataLoader(
            train, batch_sampler=DistributedBatchSampler(len(train), global_batch // dp, r, dp),
            collate_fn=collate) for r in range(dp)]
        steps = [torch.cat(batches) for batches in zip(*loaders)]  # ranks in rank order
        order = torch.cat(steps)
        assert order.shape[1] == SEQ + 1 and order.dtype == torch.int64
        if reference is None:
            reference = order
        assert torch.equal(order, reference)
    assert len(reference) == len(train) // global_batch * global_batch


def test_sampler_resumes_exactly():
    full = list(DistributedBatchSampler(100, 4, 1, 2))
    resumed = list(DistributedBatchSampler(100, 4, 1, 2, consumed_samples=3 * 8))
    assert resumed == full[3:]
    assert full[0] == [4, 5, 6, 7] and full[1] == [12, 13, 14, 15]
    assert len(DistributedBatchSampler(100, 4, 0, 2)) == 12  # the incomplete last step is dropped
    with pytest.raises(ValueError, match="dp_rank"):
        DistributedBatchSampler(100, 4, 2, 2)
    with pytest.raises(ValueError, match="consumed_samples"):
        DistributedBatchSampler(100, 4, 0, 2, consumed_samples=101)


def test_parse_data_paths():
    assert parse_data_paths(["data/a_text_document"]) == (["data/a_text_document"], [1.0])
    assert parse_data_paths(["data/a.idx"]) == (["data/a"], [1.0])
    paths, weights = parse_data_paths(["0.7 a", "0.7", "b"])
    assert paths == ["a", "b"] and weights == [0.5, 0.5]
    for bad in (["0.7"], ["0.7", "a", "0.3"], ["a", "b"], ["0.7", "a", "x", "b"],
                ["0", "a", "1", "b"], ["-1", "a", "2", "b"], ["1", "2", "3", "4"], []):
        with pytest.raises(ValueError, match="--data.paths"):
            parse_data_paths(bad)


def test_parse_split():
    assert parse_split("98,2,0") == pytest.approx([0.98, 0.02, 0.0])
    assert parse_split("9/1") == pytest.approx([0.9, 0.1, 0.0])
    for bad in ("a,b", "1,2,3,4", "0,0,0", "-1,2,0"):
        with pytest.raises(ValueError, match="--data.split"):
            parse_split(bad)


def test_clear_errors_for_impossible_requests(data, tmp_path):
    with pytest.raises(ValueError, match="--data.split"):
        build_datasets([data], [1.0], SEQ, 1, "100,0,0", (10, 5))
    tiny = make_dataset(tmp_path / "tiny", [5, 5])
    with pytest.raises(ValueError, match="leave none for the valid split"):
        build_datasets([tiny], [1.0], SEQ, 1, "99,1,0", (10, 5))
    empty = make_dataset(tmp_path / "empty", [0, 0, 0])
    with pytest.raises(ValueError, match="has no tokens"):
        build_datasets([empty], [1.0], SEQ, 1, "100,0,0", (10, 0))
    _, valid = build_datasets([data], [1.0], SEQ, 1, "100,0,0", (10, 0))
    assert len(valid) == 0
