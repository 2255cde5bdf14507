"""Launch the real trainer under torchrun with faults injected (inject.py) and watch it.

    run = launch(tmp_path / "run", "--train.steps", "10", nproc=2,
                 faults=[{"kind": "kill", "rank": 1, "step": 6}], max_restarts=1)
    run.rc, run.text, run.first("stopped responding")   # exit code, all output, (time, line) of a match

Output lines are timestamped as they arrive, so a test can bound how long survivors took to
notice a fault; ``note(run_dir, "kill", 1)`` is what the faulty rank wrote just before it.
The model, data and logging flags are tests/integration's (the smallest model: d 64, 2 layers,
seq 32).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).resolve().parent / "inject.py"

_spec = importlib.util.spec_from_file_location("_integration_conftest", REPO / "tests" / "integration" / "conftest.py")
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)
BASE, read_losses, env_without_launcher = _integration.BASE, _integration.read_losses, _integration._env


@dataclass
class Run:
    rc: int
    lines: list[tuple[float, str]] = field(default_factory=list)
    started: float = 0.0

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, needle: str) -> tuple[float, str] | None:
        return next(((t, line) for t, line in self.lines if needle in line), None)


def launch(run_dir: Path, *args: str, nproc: int = 2, faults: list[dict] | None = None, max_restarts: int = 0,
           timeout: float = 240, on_line=None) -> Run:
    """torchrun (standalone) the trainer; ``on_line(proc_lines, line)`` sees each line as it comes
    (a test may act on it, e.g. kill a stopped rank). Kills everything past ``timeout``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    for f in faults or []:
        f.setdefault("dir", str(run_dir))
    env = env_without_launcher()
    env["MEGAMOD_FAULTS"] = json.dumps(faults or [])
    env["MEGAMOD_FAULTS_DIR"] = str(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", str(INJECT),
           *BASE, "--train.run_dir", str(run_dir), *args]
    run = Run(rc=-1, started=time.time())
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)

    def read() -> None:
        for line in proc.stdout:
            run.lines.append((time.time(), line.rstrip("\n")))
            if on_line is not None:
                on_line(run, line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        run.rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        reader.join(timeout=5)
        raise AssertionError(f"{' '.join(cmd)} ran past {timeout:.0f}s (a hang):\n{run.text[-6000:]}") from None
    reader.join(timeout=5)
    return run


def note(run_dir: Path, kind: str, rank: int) -> dict:
    """What the faulty rank wrote just before its fault: pid, time, step, attempt."""
    return json.loads((run_dir / f"{kind}_rank{rank}.json").read_text())


def exit_of(run_dir: Path, rank: int, attempt: int = 0) -> dict | None:
    """{rc, time} of a rank whose ``main`` returned (None: it did not, e.g. it was killed)."""
    path = run_dir / f"exit_rank{rank}_attempt{attempt}.json"
    return json.loads(path.read_text()) if path.exists() else None


# The runs the fault tests compare: 24 steps, a checkpoint every 4 (kept), 10 s collective timeout.
COMMON = ["--train.steps", "24", "--checkpoint.interval", "4", "--checkpoint.keep_last", "10",
          "--train.collective_timeout_s", "10"]
TIMEOUT_S = 10


def train_losses_in_order(run_dir: Path) -> list[tuple[int, float]]:
    """(step, loss) of every train record of metrics.jsonl in the order written (a resumed run
    logs some steps twice)."""
    with open(run_dir / "metrics.jsonl") as f:
        return [(r["step"], r["loss"]) for r in map(json.loads, f) if r["kind"] == "train"]
