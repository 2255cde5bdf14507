"""Token datasets on disk in Megatron's MMIDIDX version-1 format, byte for byte.

A dataset is a pair of files sharing a prefix: ``{prefix}.bin`` holds the tokens, ``{prefix}.idx``
says where each sequence starts. Files written here are read by Megatron-LM and vice versa.

``.idx`` layout (all integers little-endian; S = sequence count, D = document-index entries)::

    offset      size   type     field
    0           9      bytes    magic b"MMIDIDX\\x00\\x00"
    9           8      <Q       version, always 1
    17          1      <B       dtype code of the tokens in .bin (table in ``_DTYPE_CODES``)
    18          8      <Q       S, the number of sequences
    26          8      <Q       D, the number of document-index entries = documents + 1
    34          4·S    <i4[S]   sequence lengths, in tokens
    34+4S       8·S    <i8[S]   sequence pointers: byte offset of each sequence in .bin
    34+12S      8·D    <i8[D]   document indices: document k is sequences [doc[k], doc[k+1]);
                                doc[0] = 0 and doc[D-1] = S
    34+12S+8D                   end of file (Megatron's multimodal variant appends S int8 modes;
                                we neither write nor read that)

``.bin`` is every sequence's tokens back to back in the dtype of the header, nothing else: no header,
no padding, so sequence i occupies bytes [pointer[i], pointer[i] + itemsize·length[i]).

Megatron calls D "document count" although it counts the leading 0 too; we keep its meaning so
the bytes match. ``tools/preprocess_data.py`` writes one sequence per non-empty document and none
for an empty one (as Megatron's does), so there doc[k+1] - doc[k] is 1, or 0 for an empty document.

Writing goes to temporary names that are renamed only in ``finalize``, .bin before .idx, after
removing any old .idx: a crash at any point leaves either the previous complete pair, or a .bin
without an .idx, never an .idx that describes a .bin it was not written with.
"""

from __future__ import annotations

import os
import shutil
import struct
from collections.abc import Sequence

import numpy as np

_MAGIC = b"MMIDIDX\x00\x00"
_VERSION = 1
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, S, D: 34 bytes
_HEADER_SIZE = 34

# Megatron's DType enum; the codes are part of the file format.
_DTYPE_CODES: dict[int, type[np.number]] = {
    1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
    5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16,
}
_CODE_OF_DTYPE = {np.dtype(t): c for c, t in _DTYPE_CODES.items()}


class IndexedDatasetError(ValueError):
    """A .bin/.idx pair that is missing, corrupt, or inconsistent; the message names the file."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 below 65,500 tokens (Megatron's threshold, which leaves room for a few added ids),
    else int32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 65500 else np.dtype(np.int32)


def strip_suffix(path: str) -> str:
    """``a/b.bin`` and ``a/b.idx`` name the same dataset as the prefix ``a/b``."""
    for ext in (".bin", ".idx"):
        if path.endswith(ext):
            return path[: -len(ext)]
    return path


def _code_of(dtype) -> int:
    dt = np.dtype(dtype)
    if dt not in _CODE_OF_DTYPE:
        raise ValueError(f"dtype {dt} has no MMIDIDX code; use one of "
                         f"{sorted(str(np.dtype(t)) for t in _DTYPE_CODES.values())}")
    return _CODE_OF_DTYPE[dt]


def encode_index(dtype, lengths: np.ndarray, document_indices: np.ndarray) -> bytes:
    """The complete .idx file for sequences of these lengths stored back to back."""
    dt = np.dtype(dtype)
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1] * dt.itemsize, out=pointers[1:])
    header = _HEADER.pack(_MAGIC, _VERSION, _code_of(dt), len(lengths), len(document_indices))
    return b"".join((
        header,
        lengths.astype("<i4").tobytes(),
        pointers.astype("<i8").tobytes(),
        np.asarray(document_indices, dtype="<i8").tobytes(),
    ))


class IndexedDatasetBuilder:
    """Appends documents to ``{prefix}.bin`` and writes ``{prefix}.idx`` on ``finalize()``.

    Use as a context manager so an exception removes the temporary files::

        with IndexedDatasetBuilder(prefix, dtype_for_vocab(tok.vocab_size)) as b:
            for doc in docs:
                b.add_document(tok.encode(doc))
            b.finalize()
    """

    def __init__(self, prefix: str, dtype=np.int32) -> None:
        self.prefix = strip_suffix(prefix)
        self.dtype = np.dtype(dtype)
        _code_of(self.dtype)  # fail now, not after hours of tokenizing
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        # The pid keeps two concurrent writers of one prefix apart; the last rename wins.
        suffix = f".tmp-{os.getpid()}"
        self._bin_tmp, self._idx_tmp = self.bin_path + suffix, self.idx_path + suffix
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[np.ndarray] = []  # int64 chunks, concatenated once in finalize
        self._doc_ends: list[np.ndarray] = []  # sequence count after each document
        self._num_sequences = 0
        self._done = False
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            self._range: tuple[int, int] | None = (int(info.min), int(info.max))
        else:
            self._range = None

    def __enter__(self) -> IndexedDatasetBuilder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self._done:
            self.abort()

    def _check_range(self, tokens: np.ndarray) -> None:
        # Casting 70000 to uint16 silently stores 4464; catch it here instead.
        if self._range is not None and tokens.size and np.issubdtype(tokens.dtype, np.number):
            lo, hi = tokens.min(), tokens.max()
            if lo < self._range[0] or hi > self._range[1]:
                raise ValueError(f"{self.bin_path}: token id {hi if hi > self._range[1] else lo} "
                                 f"does not fit in {self.dtype}")

    def add_document(self, tokens: Sequence[int] | np.ndarray) -> None:
        """One document stored as one sequence (what preprocess_data writes). May be empty."""
        arr = np.asarray(tokens)
        if arr.ndim != 1:
            raise ValueError(f"a document must be a 1-D token sequence, got shape {arr.shape}")
        self.add_documents(arr, np.array([arr.size], dtype=np.int64))

    def add_documents(self, tokens: np.ndarray, lengths: np.ndarray, empty_sequence: bool = True) -> None:
        """Many one-sequence documents at once: ``tokens`` is their concatenation. An empty
        document is one empty sequence, or with ``empty_sequence=False`` no sequence at all (a
        document-index entry only, as Megatron's preprocess_data writes it: several datasets
        made from one jsonl keep the same document numbering)."""
        tokens = np.asarray(tokens)
        lengths = np.asarray(lengths, dtype=np.int64).reshape(-1)
        if tokens.ndim != 1 or int(lengths.sum()) != tokens.size or (lengths < 0).any():
            raise ValueError(f"lengths (sum {int(lengths.sum())}) do not partition "
                             f"{tokens.size} tokens")
        self._check_range(tokens)
        self._bin.write(tokens.astype(self.dtype.newbyteorder("<"), copy=False).tobytes())
        sequences = np.ones(len(lengths), dtype=np.int64) if empty_sequence else (lengths > 0).astype(np.int64)
        self._lengths.append(lengths[sequences > 0])
        self._doc_ends.append(self._num_sequences + np.cumsum(sequences))
        self._num_sequences += int(sequences.sum())

    def add_index(self, prefix: str) -> None:
        """Append a whole existing dataset (documents and their sequence structure)."""
        other = IndexedDataset(prefix)
        try:
            if other.dtype != self.dtype:
                raise IndexedDatasetError(f"{other.idx_path}: tokens are {other.dtype}, "
                                          f"but {self.bin_path} is being written as {self.dtype}")
            self._lengths.append(other.sizes.astype(np.int64))
            self._doc_ends.append(self._num_sequences + other.document_indices[1:].astype(np.int64))
            self._num_sequences += len(other)
            with open(other.bin_path, "rb") as f:
                shutil.copyfileobj(f, self._bin, length=16 << 20)
        finally:
            other.close()

    def finalize(self) -> None:
        """Write the index and move both files to their final names (see the module docstring)."""
        self._bin.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        if lengths.size and lengths.max() > np.iinfo(np.int32).max:
            self.abort()
            raise ValueError(f"{self.idx_path}: a sequence of {lengths.max()} tokens does not fit "
                             "the format's int32 length")
        doc_idx = np.concatenate([np.zeros(1, np.int64), *self._doc_ends])
        with open(self._idx_tmp, "wb") as f:
            f.write(encode_index(self.dtype, lengths, doc_idx))
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(self.idx_path):
            os.remove(self.idx_path)  # so a crash below cannot pair an old .idx with the new .bin
        os.replace(self._bin_tmp, self.bin_path)
        os.replace(self._idx_tmp, self.idx_path)
        self._done = True

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are left untouched."""
        self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.remove(p)
        self._done = True


class IndexedDataset:
    """Memory-mapped reader. Every field of the .idx is checked on open, so a corrupt or
    mismatched pair fails here with the file and the problem named, not later inside numpy."""

    def __init__(self, prefix: str) -> None:
        self.prefix = strip_suffix(prefix)
        self.bin_path, self.idx_path = self.prefix + ".bin", self.prefix + ".idx"
        self._idx_mmap = self._bin_mmap = None
        self._open()

    def _fail(self, path: str, what: str) -> None:
        self.close()
        raise IndexedDatasetError(f"{path}: {what}")

    def _open(self) -> None:
        idx = self.idx_path
        for p in (idx, self.bin_path):
            if not os.path.isfile(p):
                self._fail(p, "no such file (a dataset is a .bin/.idx pair sharing a prefix)")
        idx_size = os.path.getsize(idx)
        if idx_size < _HEADER_SIZE:
            self._fail(idx, f"truncated: {idx_size} bytes, the header alone is {_HEADER_SIZE}")
        with open(idx, "rb") as f:
            magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER_SIZE))
        if magic != _MAGIC:
            self._fail(idx, f"bad magic {magic!r}, expected {_MAGIC!r}: not a Megatron MMIDIDX index")
        if version != _VERSION:
            self._fail(idx, f"unsupported version {version}, only version {_VERSION} is known")
        if code not in _DTYPE_CODES:
            self._fail(idx, f"unknown dtype code {code}, known codes are {sorted(_DTYPE_CODES)}")
        self.dtype = np.dtype(_DTYPE_CODES[code])
        expected = _HEADER_SIZE + 12 * n_seq + 8 * n_doc
        if idx_size != expected:
            hint = (" (Megatron's multimodal variant, not supported)"
                    if idx_size == expected + n_seq and n_seq else "")
            self._fail(idx, f"{idx_size} bytes, but a header of {n_seq} sequences and {n_doc} "
                            f"document entries needs exactly {expected}{hint}")

        self._idx_mmap = np.memmap(idx, mode="r", dtype=np.uint8)
        buf = self._idx_mmap
        off = _HEADER_SIZE
        self.sizes = np.frombuffer(buf, dtype="<i4", count=n_seq, offset=off)
        self.pointers = np.frombuffer(buf, dtype="<i8", count=n_seq, offset=off + 4 * n_seq)
        self.document_indices = np.frombuffer(buf, dtype="<i8", count=n_doc, offset=off + 12 * n_seq)
        self._check_index(n_seq, n_doc)

        bin_size = os.path.getsize(self.bin_path)
        item = self.dtype.itemsize
        if n_seq:
            ends = self.pointers + self.sizes.astype(np.int64) * item
            bad = np.flatnonzero((self.pointers < 0) | (ends > bin_size))
            if bad.size:
                i = int(bad[0])
                self._fail(self.bin_path, f"sequence {i} spans bytes [{self.pointers[i]}, {ends[i]}) "
                                          f"but the file has {bin_size} bytes (truncated, or the "
                                          f"index belongs to another .bin); {bad.size} sequences affected")
            used = int(ends.max())
        else:
            used = 0
        if bin_size != used:
            self._fail(self.bin_path, f"{bin_size} bytes, but the index accounts for {used}: "
                                      ".bin and .idx were not written together")
        # numpy cannot map an empty file; an empty dataset reads from an empty buffer instead.
        self._bin_mmap = (np.memmap(self.bin_path, mode="r", dtype=np.uint8) if bin_size
                          else np.zeros(0, np.uint8))
        self._tokens = np.frombuffer(self._bin_mmap, dtype=self.dtype.newbyteorder("<"))

    def _check_index(self, n_seq: int, n_doc: int) -> None:
        idx = self.idx_path
        if n_seq and int(self.sizes.min()) < 0:
            self._fail(idx, f"negative sequence length at sequence {int(np.argmin(self.sizes))}")
        doc = self.document_indices
        if n_doc < 1 or doc[0] != 0 or doc[-1] != n_seq:
            first = int(doc[0]) if n_doc else None
            last = int(doc[-1]) if n_doc else None
            self._fail(idx, f"document indices must run from 0 to the sequence count {n_seq}, "
                            f"found {n_doc} entries from {first} to {last}")
        if n_doc > 1 and (np.diff(doc) < 0).any():
            self._fail(idx, "document indices decrease")
        item = self.dtype.itemsize
        if n_seq:
            # Back to back (the layout above): a damaged length or pointer would otherwise read
            # another sequence's tokens without any error.
            expected = np.zeros(n_seq, dtype=np.int64)
            np.cumsum(self.sizes[:-1].astype(np.int64) * item, out=expected[1:])
            bad = np.flatnonzero(self.pointers != expected)
            if bad.size:
                i = int(bad[0])
                self._fail(idx, f"sequence {i} starts at byte {int(self.pointers[i])}, but the lengths before it put "
                                f"it at {int(expected[i])} (a damaged index: sequences are stored back to back)")

    def close(self) -> None:
        # Views into the maps must go first or the mmap cannot be released.
        for name in ("sizes", "pointers", "document_indices", "_tokens"):
            self.__dict__.pop(name, None)
        self._idx_mmap = self._bin_mmap = None

    # DataLoader workers started by spawn receive the prefix and map the files themselves.
    def __getstate__(self) -> dict:
        return {"prefix": self.prefix}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["prefix"])

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.sizes.sum(dtype=np.int64))

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i, a read-only view into the mapped .bin."""
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        i %= n
        size = int(self.sizes[i])
        if length is None:
            length = size - offset
        if offset < 0 or length < 0 or offset + length > size:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                             f"of {self.prefix} ({size} tokens)")
        start = int(self.pointers[i]) // self.dtype.itemsize + offset
        return self._tokens[start:start + length]
