"""Fuzzing the readers of user input with hypothesis: no crash other than the documented error,
no silent wrong read. A few hundred examples each, no deadline (the test machine is shared).

- ``.idx``: a valid dataset's index truncated, bit-flipped or given other counts (and its .bin
  cut or padded). Opening raises IndexedDatasetError, or every sequence reads back exactly as
  written. The one damage the format cannot show (it has no checksum) is a document index that
  stays sorted and in range: the sequences still read right, only document boundaries move; the
  test checks that this is the only way the index can differ from the original and still open.
- jsonl: lines of every kind (valid objects with any unicode, blank, not UTF-8, not JSON, not an
  object, the key missing or not a string, CRLF endings, a byte-order mark, no final newline),
  read in chunks of random size: exactly the documents of the valid lines, in order, and every
  other non-blank line reported under its own line number.
- config: random command lines (known and unknown flags, values of every type, ``=`` forms) and
  random YAML files: ``load_config`` + ``validate`` raise nothing but ConfigError, a loaded
  config's fields have their declared types, and ``megamod-train --dry-run`` on a bad one exits
  2 with one line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import struct
import tempfile
import typing

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from megamod.config import Config, ConfigError, load_config, validate
from megamod.config.loading import _sections
from megamod.data.indexed import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError
from megamod.data.sources import iter_documents, list_input_files

# The same examples every run (derandomize: CI stays deterministic) and no example database in
# the checkout; raise max_examples or drop derandomize locally to search further.
FUZZ = settings(max_examples=250, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])

# ---- .idx -------------------------------------------------------------------------------------

DOCS = [[1, 2, 3], [], [7], [4, 5, 6, 7, 8], [9] * 11, [300, 2]]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[bytes, bytes]:
    prefix = str(tmp_path_factory.mktemp("idx") / "d")
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for d in DOCS:
            b.add_document(d)
        b.finalize()
    return open(prefix + ".idx", "rb").read(), open(prefix + ".bin", "rb").read()


def _doc_region(n_seq: int, n_doc: int) -> range:
    start = 34 + 12 * n_seq
    return range(start, start + 8 * n_doc)


mutation = st.one_of(
    st.tuples(st.just("truncate_idx"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("flip"), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)),
                                        min_size=1, max_size=3)),
    st.tuples(st.just("flip_doc_index"), st.tuples(st.integers(1, len(DOCS) - 1), st.integers(0, 2))),
    st.tuples(st.just("counts"), st.tuples(st.integers(-3, 3), st.integers(-3, 3))),
    st.tuples(st.just("counts_same_size"), st.integers(1, 4)),
    st.tuples(st.just("truncate_bin"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("pad_bin"), st.integers(1, 9)),
)


def _mutate(idx0: bytes, bin0: bytes, m) -> tuple[bytes, bytes, set[int]]:
    """The damaged pair and the .idx byte offsets that differ from the original."""
    kind, arg = m
    idx, bin_ = bytearray(idx0), bytearray(bin0)
    if kind == "truncate_idx":
        idx = idx[: int(arg * len(idx))]
    elif kind == "flip":
        for pos, bit in arg:
            idx[int(pos * len(idx))] ^= 1 << bit
    elif kind == "flip_doc_index":  # a low bit of an inner entry: sometimes still sorted and in range
        entry, bit = arg
        idx[_doc_region(len(DOCS), len(DOCS) + 1)[8 * entry]] ^= 1 << bit
    elif kind in ("counts", "counts_same_size"):
        n_seq, n_doc = struct.unpack_from("<QQ", idx, 18)
        # 12·ΔS + 8·ΔD = 0 keeps the file size the header implies: ΔS = 2k, ΔD = -3k
        ds, dd = arg if kind == "counts" else (2 * arg, -3 * arg)
        struct.pack_into("<QQ", idx, 18, max(0, n_seq + ds), max(0, n_doc + dd))
    elif kind == "truncate_bin":
        bin_ = bin_[: int(arg * len(bin_))]
    else:
        bin_ += bytes(arg)
    changed = {i for i in range(min(len(idx), len(idx0))) if idx[i] != idx0[i]}
    return bytes(idx), bytes(bin_), changed


@settings(FUZZ, max_examples=400)
@given(m=mutation)
def test_idx_reader_fails_loudly_or_reads_exactly(pair, m):
    idx0, bin0 = pair
    idx, bin_, changed = _mutate(idx0, bin0, m)
    if (idx, bin_) == (idx0, bin0):
        return  # e.g. two flips of one bit
    with tempfile.TemporaryDirectory() as d:
        prefix = os.path.join(d, "x")
        open(prefix + ".idx", "wb").write(idx)
        open(prefix + ".bin", "wb").write(bin_)
        try:
            ds = IndexedDataset(prefix)
        except IndexedDatasetError as e:
            event("refused")
            assert str(e).startswith(prefix), e  # names the file
            return
        event("opened")
        assert len(ds) == len(DOCS) and bin_ == bin0, m
        assert [ds[i].tolist() for i in range(len(ds))] == DOCS, m  # no silent wrong read
        if list(ds.document_indices) != list(range(len(DOCS) + 1)):
            assert changed and changed <= set(_doc_region(len(DOCS), len(DOCS) + 1)), (m, changed)
        ds.close()


# ---- jsonl ------------------------------------------------------------------------------------

json_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                          max_leaves=5)
line = st.one_of(
    st.builds(lambda t, a: json.dumps({"text": t}, ensure_ascii=a).encode(), st.text(), st.booleans()),
    st.builds(lambda t, extra: json.dumps({"id": 1, **extra, "text": t}).encode(), st.text(max_size=20),
              st.dictionaries(st.text(max_size=5).filter(lambda k: k != "text"), json_value, max_size=2)),
    st.builds(lambda v: json.dumps({"text": v}).encode(), json_value),  # maybe not a string
    st.builds(lambda v: json.dumps(v).encode(), json_value),  # maybe not an object
    st.binary(max_size=30),  # garbage, maybe not UTF-8
    st.sampled_from([b"", b"   ", b"\t", b"\r", b'{"text": "half', b'{"txt": "x"}']),
)


def _oracle(raw: bytes) -> tuple[list[str], list[int]]:
    """What reading ``raw`` must give: the documents, and the line numbers reported bad."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    docs, bad = [], []
    for n, b in enumerate(lines, start=1):
        if not b.strip():
            continue
        try:
            text = b.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(n)
            continue
        if n == 1:
            text = text.removeprefix("\ufeff")
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            bad.append(n)
            continue
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        else:
            bad.append(n)
    return docs, bad


@FUZZ
@given(lines=st.lists(line, max_size=25), crlf=st.booleans(), bom=st.booleans(), final_newline=st.booleans(),
       chunk=st.integers(1, 300))
def test_jsonl_reader_returns_exactly_the_valid_documents(lines, crlf, bom, final_newline, chunk):
    lines = [x.replace(b"\n", b" ") for x in lines]  # a raw newline would make two lines
    raw = (b"\r\n" if crlf else b"\n").join(lines) + ((b"\r\n" if crlf else b"\n") if final_newline and lines else b"")
    raw = (b"\xef\xbb\xbf" if bom else b"") + raw
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "in.jsonl")
        open(path, "wb").write(raw)
        bad: list[tuple[str, int, str]] = []
        docs = [fields[0] for fields in iter_documents(list_input_files([path]), ["text"], bad=bad, chunk_bytes=chunk)]
    want_docs, want_bad = _oracle(raw)
    assert docs == want_docs
    assert [n for _, n, _ in bad] == want_bad


# ---- config and command line -----------------------------------------------------------------

FLAGS = sorted(f"--{s}.{f.name}" for s, cls in _sections().items() for f in dataclasses.fields(cls))
value = st.one_of(st.integers(-5, 5000).map(str), st.floats(allow_nan=True, allow_infinity=True).map(str),
                  st.sampled_from(["true", "false", "auto", "cpu", "bf16", "moba", "-1", "0", "1e3", "", "a,b", "nan"]),
                  st.text(max_size=8))
flag = st.one_of(st.sampled_from(FLAGS), st.sampled_from(["--model.n_layer", "--nope.x", "--train", "-x", "--a.b.c"]))
argv = st.lists(st.one_of(st.tuples(flag, value).map(list), st.tuples(flag).map(list),
                          st.tuples(flag, value).map(lambda fv: [f"{fv[0]}={fv[1]}"]),
                          st.tuples(flag, value, value).map(list)), max_size=6).map(lambda xs: [a for x in xs for a in x])


def _check_types(cfg: Config) -> None:
    for section, cls in _sections().items():
        obj = getattr(cfg, section)
        for name, tp in typing.get_type_hints(cls).items():
            v = getattr(obj, name)
            origin = typing.get_origin(tp)
            if origin is list:
                assert isinstance(v, list), (section, name, v)
            elif origin is typing.Literal:
                assert v in typing.get_args(tp), (section, name, v)
            else:
                assert type(v) is tp, (section, name, v, tp)


@FUZZ
@given(args=argv, world=st.integers(1, 64))
def test_command_line_raises_nothing_but_config_errors(args, world):
    from megamod.train.cli import main

    if {"-h", "--help", "--dry-run", "--world-size", "--config"} & {a.split("=")[0] for a in args}:
        return  # the launcher's own flags (help wins over everything): not config input
    try:
        cfg = load_config(None, args)
        _check_types(cfg)
        validate(cfg, world)
        return  # valid: the trainer would run it (not started here: a real run per example is too slow)
    except ConfigError:
        pass
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["--dry-run", "--world-size", str(world), *args])
    lines = err.getvalue().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("megamod-train: error: "), (args, err.getvalue())


yaml_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
yaml_doc = st.one_of(
    st.dictionaries(st.sampled_from([*_sections(), "nope"]),
                    st.one_of(st.dictionaries(st.sampled_from([f.split(".")[1] for f in FLAGS] + ["bogus"]),
                                              st.one_of(yaml_scalar, st.lists(yaml_scalar, max_size=3),
                                                        st.dictionaries(st.text(max_size=3), yaml_scalar, max_size=2)),
                                              max_size=4),
                              yaml_scalar), max_size=4),
    st.lists(yaml_scalar, max_size=3), yaml_scalar)


@FUZZ
@given(doc=yaml_doc, raw=st.one_of(st.none(), st.text(max_size=40)))
def test_yaml_config_raises_nothing_but_config_errors(doc, raw):
    import yaml

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "c.yaml")
        with open(path, "w") as f:
            f.write(raw if raw is not None else yaml.safe_dump(doc))
        try:
            cfg = load_config(path, [])
        except ConfigError:
            return
        _check_types(cfg)
        with contextlib.suppress(ConfigError):
            validate(cfg, 8)
