"""Run a snippet under Triton's interpreter (TRITON_INTERPRET=1) in a child process.

The interpreter must be switched on before triton is imported, so the checks run in a fresh
interpreter and report back one JSON line prefixed "RESULT"; the pytest process keeps the
compiled triton. The child sees the repository and this directory on its path (MOBA_TEST_DIR)."""

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def run_interpreted(source: str, timeout: int = 900) -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MOBA_TEST_DIR=HERE)
    p = subprocess.run([sys.executable, "-W", "ignore", "-c", source], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, p.stderr[-3000:]
    line = [x for x in p.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])
