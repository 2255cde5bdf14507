"""MMIDIDX .bin/.idx: exact bytes, round trips, and loud failures on corrupt files."""

from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from megamod.data.indexed import (IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError,
                                  dtype_for_vocab, encode_index)


def write(prefix, docs, dtype=np.uint16):
    with IndexedDatasetBuilder(str(prefix), dtype) as b:
        for d in docs:
            b.add_document(d)
        b.finalize()
    return str(prefix)


def test_idx_bytes_match_hand_computed_layout(tmp_path):
    # Four documents, one sequence each, uint16: [1 2 3], [], [7], [4 5].
    prefix = write(tmp_path / "d", [[1, 2, 3], [], [7], [4, 5]])
    expected_idx = b"".join([
        b"MMIDIDX\x00\x00",                        # magic, 9 bytes
        bytes.fromhex("0100000000000000"),         # version 1, <Q
        bytes.fromhex("08"),                       # dtype code 8 = uint16, <B
        bytes.fromhex("0400000000000000"),         # 4 sequences, <Q
        bytes.fromhex("0500000000000000"),         # 5 document-index entries (4 documents + 1)
        bytes.fromhex("03000000" "00000000" "01000000" "02000000"),  # lengths 3 0 1 2, <i4
        bytes.fromhex("0000000000000000" "0600000000000000"          # pointers 0 6 6 8 bytes:
                      "0600000000000000" "0800000000000000"),        # 2 bytes per uint16 token
        bytes.fromhex("0000000000000000" "0100000000000000" "0200000000000000"
                      "0300000000000000" "0400000000000000"),        # document indices 0..4
    ])
    assert len(expected_idx) == 34 + 12 * 4 + 8 * 5
    assert open(prefix + ".idx", "rb").read() == expected_idx
    assert open(prefix + ".bin", "rb").read() == bytes.fromhex("0100" "0200" "0300" "0700" "0400" "0500")


@pytest.mark.parametrize("vocab", [50_000, 200_000])
def test_round_trip_with_empty_documents(tmp_path, vocab):
    rng = np.random.default_rng(0)
    dtype = dtype_for_vocab(vocab)
    lengths = [0, 5, 0, 0, 1, 300, 0, 17]
    docs = [rng.integers(0, vocab, n) for n in lengths]
    docs[1][0] = vocab - 1  # the largest id must survive the dtype
    ds = IndexedDataset(write(tmp_path / "d", docs, dtype))
    assert ds.dtype == dtype and len(ds) == len(docs) and ds.num_documents == len(docs)
    assert list(ds.document_indices) == list(range(len(docs) + 1))
    assert list(ds.sizes) == lengths and ds.num_tokens == sum(lengths)
    for i, d in enumerate(docs):
        assert np.array_equal(ds[i], d)
    assert np.array_equal(ds.get(5, 10, 4), docs[5][10:14])
    assert np.array_equal(ds.get(5, 298), docs[5][298:])
    with pytest.raises(IndexError):
        ds.get(7, 10, 8)
    with pytest.raises(IndexError):
        ds[len(docs)]
    clone = pickle.loads(pickle.dumps(ds))  # DataLoader workers re-map the files
    assert np.array_equal(clone[5], docs[5])


def test_dtype_for_vocab_threshold():
    assert dtype_for_vocab(65_499) == np.uint16
    assert dtype_for_vocab(65_500) == np.int32
    with pytest.raises(ValueError):
        dtype_for_vocab(0)


def test_token_out_of_dtype_range_is_rejected(tmp_path):
    with IndexedDatasetBuilder(str(tmp_path / "d"), np.uint16) as b:
        with pytest.raises(ValueError, match="does not fit in uint16"):
            b.add_document([1, 70_000])


def test_all_empty_dataset(tmp_path):
    ds = IndexedDataset(write(tmp_path / "d", [[], []]))
    assert len(ds) == 2 and ds.num_tokens == 0 and ds[1].size == 0


def test_nothing_under_final_names_until_finalize(tmp_path):
    prefix = str(tmp_path / "d")
    b = IndexedDatasetBuilder(prefix, np.uint16)
    b.add_document([1, 2])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    b.abort()
    assert os.listdir(tmp_path) == []
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(prefix, np.uint16) as b:
            b.add_document([1, 2])
            raise RuntimeError("killed mid-write")
    assert os.listdir(tmp_path) == []


def test_finalize_replaces_old_pair(tmp_path):
    prefix = write(tmp_path / "d", [[1, 2, 3]])
    write(prefix, [[9], [8]])
    ds = IndexedDataset(prefix)
    assert len(ds) == 2 and list(ds[0]) == [9]


def test_multi_sequence_documents(tmp_path):
    # Megatron's sentence-split layout: document 0 is sequences 0-1, document 1 is sequence 2.
    prefix = str(tmp_path / "m")
    open(prefix + ".bin", "wb").write(np.array([1, 2, 3, 4, 5], "<i4").tobytes())
    open(prefix + ".idx", "wb").write(encode_index(np.int32, np.array([2, 1, 2]), np.array([0, 2, 3])))
    ds = IndexedDataset(prefix)
    assert ds.num_documents == 2 and list(ds.document_indices) == [0, 2, 3]
    assert [list(ds[i]) for i in range(3)] == [[1, 2], [3], [4, 5]]


def test_merge_concatenates_documents(tmp_path):
    a = write(tmp_path / "a", [[1, 2], []])
    b = write(tmp_path / "b", [[3], [4, 5, 6]])
    with IndexedDatasetBuilder(str(tmp_path / "ab"), np.uint16) as m:
        m.add_index(a)
        m.add_index(b)
        m.finalize()
    ds = IndexedDataset(str(tmp_path / "ab"))
    assert [list(ds[i]) for i in range(len(ds))] == [[1, 2], [], [3], [4, 5, 6]]
    assert list(ds.document_indices) == [0, 1, 2, 3, 4]
    with IndexedDatasetBuilder(str(tmp_path / "x"), np.int32) as m:
        with pytest.raises(IndexedDatasetError, match="uint16"):
            m.add_index(a)


# --- corrupt inputs: each must name the file and the problem --------------------------------

def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@pytest.fixture
def good(tmp_path):
    return write(tmp_path / "c", [[1, 2, 3], [4], [5, 6]])


def _fails(prefix, bad_file, *phrases):
    with pytest.raises(IndexedDatasetError) as e:
        IndexedDataset(prefix)
    msg = str(e.value)
    assert msg.startswith(bad_file), msg
    for p in phrases:
        assert p in msg, msg


def test_truncated_bin(good):
    os.truncate(good + ".bin", 8)
    _fails(good, good + ".bin", "sequence 2", "truncated")


def test_bin_with_extra_bytes(good):
    with open(good + ".bin", "ab") as f:
        f.write(b"\x00\x00")
    _fails(good, good + ".bin", "not written together")


def test_wrong_magic(good):
    _patch(good + ".idx", 0, b"XXIDIDX")
    _fails(good, good + ".idx", "bad magic")


def test_wrong_version(good):
    _patch(good + ".idx", 9, struct.pack("<Q", 2))
    _fails(good, good + ".idx", "version 2")


def test_unknown_dtype_code(good):
    _patch(good + ".idx", 17, b"\x09")
    _fails(good, good + ".idx", "dtype code 9")


def test_pointer_past_end(good):
    # pointers start at 34 + 4·3; move sequence 1 far beyond the 12-byte .bin.
    _patch(good + ".idx", 34 + 12 + 8, struct.pack("<q", 1000))
    _fails(good, good + ".idx", "sequence 1 starts at byte 1000", "back to back")


def test_pointer_inside_the_file_but_not_back_to_back(good):
    # Sequence 1 moved onto sequence 0's bytes: in range and aligned, so only the layout rule
    # (each sequence starts where the previous one ends) tells that it would read wrong tokens.
    _patch(good + ".idx", 34 + 12 + 8, struct.pack("<q", 0))
    _fails(good, good + ".idx", "sequence 1 starts at byte 0")


def test_negative_length(good):
    _patch(good + ".idx", 34, struct.pack("<i", -1))
    _fails(good, good + ".idx", "negative sequence length")


def test_truncated_idx(good):
    size = os.path.getsize(good + ".idx")
    os.truncate(good + ".idx", size - 3)
    _fails(good, good + ".idx", f"{size - 3} bytes")
    os.truncate(good + ".idx", 20)
    _fails(good, good + ".idx", "header")


def test_bad_document_indices(good):
    _patch(good + ".idx", 34 + 12 * 3 + 8 * 3, struct.pack("<q", 2))  # last entry 2, not 3
    _fails(good, good + ".idx", "document indices")


def test_missing_bin(good):
    os.remove(good + ".bin")
    _fails(good, good + ".bin", "no such file")
