"""Raw text inputs: jsonl files, plain text files, or directories of either.

Inputs are read in chunks of whole lines, so a worker process can parse and tokenize a chunk on its
own and the caller never holds more than a chunk per worker in memory. Bad lines (not UTF-8, not
JSON, a key missing or not a string) are reported with their line numbers instead of stopping the
run; callers decide whether one is fatal (``--strict``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
TEXT_UNITS = ("file", "line")


@dataclass(frozen=True)
class InputFile:
    path: str
    kind: str  # "jsonl" or "text"


@dataclass(frozen=True)
class Chunk:
    """Bytes [start, end) of one file; both ends fall on line starts."""
    file: InputFile
    start: int
    end: int


@dataclass
class ChunkResult:
    docs: list[list[str]]  # one list per key, aligned: docs[k][j] is field k of document j
    num_lines: int  # newline-terminated or final lines in the chunk, for absolute numbering
    bad: list[tuple[int, str]] = field(default_factory=list)  # (1-based line within chunk, reason)


def list_input_files(paths: Sequence[str]) -> list[InputFile]:
    """Files in the order given; a directory contributes its files recursively in sorted order
    (hidden entries and __pycache__ skipped) so repeated runs see the same order."""
    out: list[InputFile] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__")
                out += [_classify(os.path.join(root, f)) for f in sorted(files) if not f.startswith(".")]
        elif os.path.isfile(p):
            out.append(_classify(p))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


def _classify(path: str) -> InputFile:
    return InputFile(path, "jsonl" if path.lower().endswith(JSONL_SUFFIXES) else "text")


def plan_chunks(files: Sequence[InputFile], chunk_bytes: int, text_unit: str = "file") -> list[Chunk]:
    """Cut every line-oriented file into chunks of about ``chunk_bytes``, each ending after a newline.
    A text file read as one document stays whole."""
    if text_unit not in TEXT_UNITS:
        raise ValueError(f"text unit must be one of {TEXT_UNITS}, got {text_unit!r}")
    chunks = []
    for f in files:
        size = os.path.getsize(f.path)
        if f.kind == "text" and text_unit == "file":
            chunks.append(Chunk(f, 0, size))
            continue
        start = 0
        with open(f.path, "rb") as fh:
            while start < size:
                fh.seek(min(start + chunk_bytes, size))
                fh.readline()  # move to the next line start
                end = min(fh.tell(), size)
                chunks.append(Chunk(f, start, end))
                start = end
    return chunks


def read_chunk(chunk: Chunk, keys: Sequence[str], text_unit: str = "file") -> ChunkResult:
    with open(chunk.file.path, "rb") as fh:
        fh.seek(chunk.start)
        raw = fh.read(chunk.end - chunk.start)
    if chunk.file.kind == "text" and text_unit == "file":
        return _text_document(raw)
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the chunk ends with a newline
    n_fields = len(keys) if chunk.file.kind == "jsonl" else 1  # a text line is one field
    result = ChunkResult(docs=[[] for _ in range(n_fields)], num_lines=len(lines))
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue  # blank lines carry no document in either format
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            result.bad.append((lineno, f"not UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})"))
            continue
        if lineno == 1 and chunk.start == 0:
            text = text.removeprefix("\ufeff")  # a byte-order mark is not content
        if chunk.file.kind == "text":
            result.docs[0].append(text.removesuffix("\r"))
            continue
        fields = parse_json_line(text, keys)
        if isinstance(fields, str):
            result.bad.append((lineno, fields))
        else:
            for k, value in enumerate(fields):
                result.docs[k].append(value)
    return result


def _text_document(raw: bytes) -> ChunkResult:
    num_lines = raw.count(b"\n") + (1 if raw and not raw.endswith(b"\n") else 0)
    try:
        text = raw.decode("utf-8-sig")  # -sig: drop a byte-order mark, which is not content
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        return ChunkResult(docs=[[]], num_lines=num_lines,
                           bad=[(line, f"not UTF-8 (byte 0x{raw[e.start]:02x}); file skipped")])
    return ChunkResult(docs=[[text]], num_lines=num_lines)


def parse_json_line(text: str, keys: Sequence[str]) -> list[str] | str:
    """The string value of every key, or a reason why the line is unusable."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        return f"invalid JSON ({e.msg} at column {e.colno})"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, expected an object"
    values = []
    for key in keys:
        if key not in obj:
            return f"missing key {key!r}"
        if not isinstance(obj[key], str):
            return f"key {key!r} is a {type(obj[key]).__name__}, expected a string"
        values.append(obj[key])
    return values


def iter_documents(files: Sequence[InputFile], keys: Sequence[str], text_unit: str = "file",
                   bad: list[tuple[str, int, str]] | None = None,
                   chunk_bytes: int = 4 << 20) -> Iterator[list[str]]:
    """Every usable document in order as [value per key]; bad lines are appended to ``bad`` as
    (path, line, reason). Streams: one chunk in memory at a time."""
    line0 = 0
    for c in plan_chunks(files, chunk_bytes, text_unit):
        if c.start == 0:
            line0 = 0  # a new file
        r = read_chunk(c, keys, text_unit)
        if bad is not None:
            bad.extend((c.file.path, line0 + n, why) for n, why in r.bad)
        line0 += r.num_lines
        yield from (list(fields) for fields in zip(*r.docs))
