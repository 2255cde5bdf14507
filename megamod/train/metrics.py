"""Logging sinks owned by the trainer: TensorBoard, a metrics.jsonl file, the console.

Only rank 0 writes. Values arrive as plain floats at log intervals, so nothing here forces a
device sync on the hot path.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool, progress: str, total_steps: int) -> None:
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        self.bar = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.tb_dir = os.path.join(run_dir, "tensorboard")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(self.tb_dir)
        self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        show_bar = progress == "on" or (progress == "auto" and sys.stderr.isatty() and not os.environ.get("CI"))
        if show_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, dynamic_ncols=True, desc="train")

    def log(self, step: int, values: dict[str, float], kind: str = "train") -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{kind}/{k}", v, step)
        self.jsonl.write(json.dumps({"kind": kind, "step": step, "time": time.time(), **values}) + "\n")
        self.jsonl.flush()
        line = f"[{kind}] step {step:>6d} " + " ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def advance(self, steps: int, postfix: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def text(self, tag: str, text: str, step: int) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.jsonl is not None:
            self.jsonl.close()


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
            return f"{v:.3e}"
        return f"{v:.4f}"
    return str(v)
