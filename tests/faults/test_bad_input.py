"""Bad input ends in one line naming the fix and exit code 2, never a traceback: through the real
``megamod-train`` entry point, one process, several cases in a row (``main`` tears its process
group down after such an error, so the next case starts clean and the interpreter starts once)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np

from _faults import BASE, REPO, env_without_launcher

_RUNNER = """
import contextlib, io, json, sys
from megamod.train.cli import main
out = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            rc = main(argv)
    except BaseException as e:  # a traceback is what must not happen
        rc, err = f"raised {type(e).__name__}: {e}", err
    out.append({"rc": rc, "stderr": err.getvalue()})
print("RESULTS " + json.dumps(out))
"""


def _run_cases(cases: list[list[str]]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER, json.dumps(cases)], cwd=REPO, env=env_without_launcher(),
                          capture_output=True, text=True, timeout=300)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULTS ")), None)
    assert line is not None, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(line.removeprefix("RESULTS "))


def test_bad_data_and_checkpoints_end_in_one_line_and_exit_2(tmp_path):
    from megamod.data.indexed import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "wide")  # token ids up to 999: a tokenizer with more pieces than the model's 512
    with IndexedDatasetBuilder(prefix, np.uint16) as b:
        for _ in range(50):
            b.add_document(rng.integers(0, 1000, 200))
        b.finalize()
    cut = str(tmp_path / "cut")  # the same pair with its index cut short
    for ext in (".bin", ".idx"):
        data = open(prefix + ext, "rb").read()
        open(cut + ext, "wb").write(data[: len(data) - 3] if ext == ".idx" else data)

    common = [a for a in BASE if a not in ("--data.synthetic", "true")] + ["--train.steps", "2"]
    cases = {
        "missing data": [*common, "--data.paths", str(tmp_path / "nope"), "--train.run_dir", str(tmp_path / "a")],
        "truncated index": [*common, "--data.paths", cut, "--train.run_dir", str(tmp_path / "b")],
        "wrong tokenizer": [*common, "--data.paths", prefix, "--train.run_dir", str(tmp_path / "c")],
        "no data at all": [*common, "--train.run_dir", str(tmp_path / "d")],
        "bad value": [*BASE, "--train.collective_timeout_s", "-1"],
    }
    want = {
        "missing data": f"{tmp_path / 'nope'}.idx: no such file",
        "truncated index": f"{cut}.idx: ",
        "wrong tokenizer": "is outside --model.vocab_size 512: the data was tokenized with another tokenizer",
        "no data at all": "no training data: set --data.paths",
        "bad value": "--train.collective_timeout_s -1.0 must be positive",
    }
    results = dict(zip(cases, _run_cases(list(cases.values()))))
    for name, r in results.items():
        lines = [x for x in r["stderr"].splitlines() if x.strip()]
        assert r["rc"] == 2, (name, r)
        assert len(lines) == 1 and lines[0].startswith("megamod-train: error: "), (name, r["stderr"][-2000:])
        assert want[name] in lines[0], (name, lines[0])
        assert "Traceback" not in r["stderr"]
