"""Checkpoint manifests without a process group: what a save records, what verification finds."""

from __future__ import annotations

import errno
import json
import os

from megamod.train.ckpt_integrity import SaveRecorder, crc32_of, verify
from megamod.train.ckpt_layout import MARKER


class _Engine:
    def __init__(self):
        self.checkpoint_engine = self

    def save(self, state_dict, path):
        with open(path, "wb") as f:
            f.write(state_dict)

    def is_decoupled(self):
        return False


def _tag(tmp_path, files: dict[str, bytes]):
    engine = _Engine()
    root = tmp_path / "step_00000001"
    root.mkdir()
    rec = SaveRecorder.install(engine)
    for name, data in files.items():
        engine.checkpoint_engine.save(data, str(root / name))
    manifest = rec.manifest(str(root))
    (root / MARKER).write_text(json.dumps({"files": manifest}))
    return engine, rec, root


def test_recorder_delegates_and_lists_what_was_written(tmp_path):
    engine, rec, root = _tag(tmp_path, {"a.pt": b"x" * 100, "b.pt": b""})
    assert engine.checkpoint_engine.is_decoupled() is False  # the rest of DeepSpeed's engine, as it was
    assert SaveRecorder.install(engine) is rec  # installed once; a new save starts a new list
    assert json.loads((root / MARKER).read_text())["files"]["a.pt"] == {"size": 100, "crc32": crc32_of(root / "a.pt")[1]}
    assert verify(str(tmp_path), "step_00000001") == []


def test_a_failed_write_is_recorded_the_partial_file_removed_and_later_writes_skipped(tmp_path):
    engine = _Engine()
    rec = SaveRecorder.install(engine)

    def full(state_dict, path):
        open(path, "wb").write(b"half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    rec.inner = type("E", (), {"save": staticmethod(full)})()
    rec.save(b"data", str(tmp_path / "a.pt"))
    rec.save(b"data", str(tmp_path / "b.pt"))
    assert rec.errors == [f"{tmp_path / 'a.pt'}: [Errno 28] No space left on device"]
    assert not (tmp_path / "a.pt").exists() and not (tmp_path / "b.pt").exists() and rec.written == []


def test_verify_names_a_flipped_byte_a_truncation_and_a_missing_file(tmp_path):
    _, _, root = _tag(tmp_path, {"a.pt": bytes(range(256)) * 4, "b.pt": b"y" * 50, "c.pt": b"z"})
    data = bytearray((root / "a.pt").read_bytes())
    data[500] ^= 0x10
    (root / "a.pt").write_bytes(bytes(data))
    os.truncate(root / "b.pt", 20)
    (root / "c.pt").unlink()
    problems = verify(str(tmp_path), "step_00000001")
    assert len(problems) == 3
    assert "a.pt: CRC-32" in problems[0] and "(corrupted)" in problems[0]
    assert "b.pt: 20 bytes, the manifest says 50" in problems[1]
    assert "c.pt: unreadable" in problems[2]
    (root / MARKER).write_text("{not json")
    assert "megamod_complete.json: unreadable" in verify(str(tmp_path), "step_00000001")[0]
