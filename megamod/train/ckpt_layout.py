"""Where checkpoint files live and which tags are complete: the layout shared by checkpoint.py
(saving, loading) and reshard.py (converting), so neither imports the other's internals.

    {ckpt_dir}/step_00000100/            one tag per save (``tag_for``)
        pp_stage_00/                     a pipeline stage's DeepSpeed files (``stage_dir``), pp > 1
        megamod_complete.json            the completeness marker (``MARKER``), written last

checkpoint.py's docstring describes every file of a tag.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

MARKER = "megamod_complete.json"
_TAG_RE = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def stage_dir(stage: int) -> str:
    return f"pp_stage_{stage:02d}"


def engine_location(ckpt_dir: str, tag: str, stage: int | None) -> tuple[str, str]:
    """(save_dir, tag) for DeepSpeed: the step's directory itself, or a stage's inside it."""
    return (ckpt_dir, tag) if stage is None else (os.path.join(ckpt_dir, tag), stage_dir(stage))


def list_tags(ckpt_dir: str) -> list[tuple[int, str, bool]]:
    """(step, tag, complete) for every step_* directory, newest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    out = []
    for name in os.listdir(ckpt_dir):
        m = _TAG_RE.match(name)
        if m:
            out.append((int(m.group(1)), name, os.path.exists(os.path.join(ckpt_dir, name, MARKER))))
    return sorted(out, reverse=True)


def find_latest_complete(ckpt_dir: str) -> str | None:
    for _, tag, complete in list_tags(ckpt_dir):
        if complete:
            return tag
    return None


def read_meta(ckpt_dir: str, tag: str) -> dict[str, Any]:
    with open(os.path.join(ckpt_dir, tag, MARKER)) as f:
        return json.load(f)


def resolve_checkpoint(path: str, tag: str | None = None) -> tuple[str, str]:
    """(ckpt_dir, tag) of a complete checkpoint named by a run directory (its newest complete tag,
    or ``tag``), its ``checkpoints/`` directory, or one tag's directory. FileNotFoundError, saying
    what was looked for, when there is none."""
    path = os.path.normpath(path)
    if os.path.isfile(os.path.join(path, MARKER)):  # a tag directory
        return os.path.dirname(path), os.path.basename(path)
    ckpt_dir = os.path.join(path, "checkpoints") if os.path.isdir(os.path.join(path, "checkpoints")) else path
    if tag is not None:
        if not os.path.isfile(os.path.join(ckpt_dir, tag, MARKER)):
            raise FileNotFoundError(f"{ckpt_dir}/{tag} is not a complete checkpoint (no {MARKER})")
        return ckpt_dir, tag
    found = find_latest_complete(ckpt_dir)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a run directory, its checkpoints/ directory or "
                                f"a step_* directory holding {MARKER})")
    return ckpt_dir, found
