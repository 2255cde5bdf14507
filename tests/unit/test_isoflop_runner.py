"""The sweep runner's bookkeeping without training (the CPU sweep test trains): what counts as
finished, the time limit, the Slurm task lines, and tables that cannot be read."""

import json

import pytest

from megamod.train.isoflop.plan import plan, spec_from_dict
from megamod.train.isoflop.results import REQUIRED, ResultsError, read_table, write_csv
from megamod.train.isoflop.runner import run_sweep, task


@pytest.fixture
def manifest(tmp_path):
    m = plan(spec_from_dict({
        "config": "examples/configs/debug.yaml", "min_steps": 3, "tolerance": 0.5,
        "overrides": ["--data.synthetic", "true", "--train.seq_len", "32", "--train.micro_batch_size", "4"],
        "rule": {"aspect": 32, "head_dim": 16, "ffn_multiple": 16},
        "groups": [{"name": "g", "budgets": [2e10], "variants": ["dense"], "depths": [1, 2]}]}))
    path = tmp_path / "m.json"
    path.write_text(json.dumps(m))
    return path, m


def test_time_limit_starts_nothing_that_would_not_fit(tmp_path, manifest):
    path, m = manifest
    lines = []
    assert run_sweep(str(path), str(tmp_path / "runs"), time_limit_s=1.0, echo=lines.append) == 1
    assert "time limit" in lines[-1] and not (tmp_path / "runs" / m["runs"][0]["name"]).exists()


def test_runs_in_the_table_count_as_finished(tmp_path, manifest):
    path, m = manifest
    first, second = m["runs"]
    sweep = tmp_path / "runs"
    sweep.mkdir()
    write_csv(str(sweep / "results.csv"), [{**{k: 1 for k in REQUIRED}, "variant": "dense", "name": first["name"]}],
              [*REQUIRED, "name"])
    status, run_dir, config, *flags = task(str(path), 0, str(sweep))
    assert (status, run_dir, config) == ("done", str(sweep / first["name"]), "examples/configs/debug.yaml")
    assert flags == first["args"]
    assert task(str(path), 1, str(sweep))[0] == "todo"
    lines = []
    assert run_sweep(str(path), str(sweep), dry_run=True, echo=lines.append) == 0
    assert lines[0] == f"skip {first['name']}: in the results table"
    assert lines[1].endswith(f"--train.run_dir {sweep / second['name']}") and "-m megamod.train" in lines[1]
    with pytest.raises(ValueError, match="no run 2"):
        task(str(path), 2, str(sweep))


def test_a_table_without_a_required_column_names_it(tmp_path):
    bad = tmp_path / "t.csv"
    bad.write_text("variant,params,loss\ndense,100,3.0\n")
    with pytest.raises(ResultsError, match="no column 'non_embedding_params'"):
        read_table(str(bad))
