"""The rank grid and the mpu interface, as pure arithmetic (no process group), plus the grid
checks config.validate makes before any process starts."""

import itertools

import pytest

from megamod.config import ConfigError, load_config, validate
from megamod.parallel.dims import ORDER, ParallelDims

# (tp, cp, dp, pp), up to 256 ranks: degenerate, each dimension alone, mixed, and a large grid.
GRIDS = [(1, 1, 1, 1), (8, 1, 1, 1), (1, 1, 8, 1), (1, 4, 1, 1), (1, 1, 1, 4), (2, 1, 2, 1), (2, 2, 2, 2),
         (4, 2, 4, 2), (8, 2, 8, 2), (2, 4, 4, 8), (8, 1, 32, 1)]


def test_megatron_example_16_ranks():
    """Megatron-LM's parallel_state docstring: 16 GPUs, tp=2, pp=4 (so dp=2)."""
    d = ParallelDims(tp=2, cp=1, dp=2, pp=4)
    assert d.group_ranks(("tp",)) == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert d.group_ranks(("dp",)) == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert d.group_ranks(("pp",)) == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]


@pytest.mark.parametrize("tp, cp, dp, pp", GRIDS)
def test_rank_layout_tp_fastest(tp, cp, dp, pp):
    """rank = tp_i + tp·(cp_i + cp·(dp_i + dp·pp_i)): coords and rank_of are inverse, and every
    rank of the world has exactly one coordinate tuple."""
    d = ParallelDims(tp=tp, cp=cp, dp=dp, pp=pp)
    assert d.world_size == tp * cp * dp * pp <= 256
    seen = set()
    for r in range(d.world_size):
        c = d.coords(r)
        assert r == c["tp"] + tp * (c["cp"] + cp * (c["dp"] + dp * c["pp"]))
        assert d.rank_of(**c) == r
        seen.add(tuple(c[n] for n in ORDER))
    assert len(seen) == d.world_size


@pytest.mark.parametrize("tp, cp, dp, pp", GRIDS)
def test_groups_partition_the_world_and_share_the_other_coordinates(tp, cp, dp, pp):
    d = ParallelDims(tp=tp, cp=cp, dp=dp, pp=pp)
    for name, dims in ParallelDims.GROUPS.items():
        groups = d.group_ranks(dims)
        size = 1
        for n in dims:
            size *= getattr(d, n)
        assert all(len(g) == size for g in groups), name
        assert sorted(itertools.chain(*groups)) == list(range(d.world_size)), name  # disjoint, covering
        for g in groups:
            fixed = [n for n in ORDER if n not in dims]
            assert len({tuple(d.coords(r)[n] for n in fixed) for r in g}) == 1, name  # one fixed point
            assert len({tuple(d.coords(r)[n] for n in dims) for r in g}) == size, name  # all varying values
    # TP groups are blocks of consecutive ranks (inside a node); DP × CP is the union of the CP
    # groups along DP, which is what ZeRO partitions over.
    assert d.group_ranks(("tp",)) == [list(range(i, i + tp)) for i in range(0, d.world_size, tp)]
    for r in range(d.world_size):
        c = d.coords(r)
        dp_cp = d.group_of("dp_cp", r)
        assert dp_cp == sorted(d.rank_of(**{**c, "dp": i, "cp": j}) for i in range(dp) for j in range(cp))
        assert d.group_of("mp", r) == sorted(d.rank_of(**{**c, "tp": i, "pp": j}) for i in range(tp) for j in range(pp))


class _Group:
    def __init__(self, name):
        self.name = name


@pytest.mark.parametrize("tp, cp, dp, pp", [(2, 2, 2, 2), (4, 1, 2, 1), (1, 2, 4, 1)])
def test_mpu_interface(tp, cp, dp, pp):
    """What DeepSpeed calls, for every rank: ranks are positions inside the group's sorted rank
    list (what dist.get_rank(group) returns), sizes are the degrees."""
    for rank in range(tp * cp * dp * pp):
        d = ParallelDims(tp=tp, cp=cp, dp=dp, pp=pp, rank=rank)
        d.groups = {name: _Group(name) for name in ParallelDims.GROUPS}
        c = d.coords()
        assert d.get_tensor_model_parallel_group().name == "tp"
        assert d.get_model_parallel_group().name == "mp"  # TP × PP: norms sum over every stage
        assert d.get_data_parallel_group().name == "dp"
        assert d.get_sequence_parallel_group().name == "cp"
        assert d.get_sequence_data_parallel_group().name == "dp_cp"
        assert d.get_pipe_parallel_group().name == "pp"
        for name, rank_fn, size_fn in [
            ("tp", d.get_tensor_model_parallel_rank, d.get_tensor_model_parallel_world_size),
            ("tp", d.get_model_parallel_rank, d.get_model_parallel_world_size),
            ("dp", d.get_data_parallel_rank, d.get_data_parallel_world_size),
            ("cp", d.get_sequence_parallel_rank, d.get_sequence_parallel_world_size),
            ("dp_cp", d.get_sequence_data_parallel_rank, d.get_sequence_data_parallel_world_size),
        ]:
            g = d.group_of(name)
            assert rank_fn() == g.index(rank) and size_fn() == len(g), name
        assert d.get_data_parallel_group_ranks() == d.group_of("dp")
        assert d.get_pipe_parallel_rank() == d.group_of("pp").index(rank)
        assert d.get_pipe_parallel_world_size() == 1  # one engine per stage (dims.py docstring)
        assert d.get_tensor_model_parallel_src_rank() == rank - c["tp"]


def test_deepspeed_reads_our_mpu():
    """DeepSpeed's own accessors (utils/bwc.py) resolve to our TP/PP methods, not fallbacks."""
    from deepspeed.utils.bwc import (bwc_pipeline_parallel_world_size, bwc_tensor_model_parallel_rank,
                                     bwc_tensor_model_parallel_world_size)

    d = ParallelDims(tp=4, cp=1, dp=2, pp=2, rank=13)  # coords tp=1, dp=1, pp=1
    assert bwc_tensor_model_parallel_rank(d) == 1
    assert bwc_tensor_model_parallel_world_size(d) == 4
    # One DeepSpeed engine per pipeline stage: to DeepSpeed a stage is a whole model, so its
    # checkpoint files read as pp=1 (ds_to_universal counts files by this size).
    assert bwc_pipeline_parallel_world_size(d) == 1


def test_bad_dims_are_refused():
    with pytest.raises(ValueError, match="tp=0 must be >= 1"):
        ParallelDims(tp=0, cp=1, dp=1, pp=1)
    with pytest.raises(ValueError, match="rank 8 outside the grid of 8 ranks"):
        ParallelDims(tp=2, cp=1, dp=4, pp=1, rank=8)


# ---- grid validation before any process starts: one ConfigError naming the flag ------------
_TINY = ["--data.synthetic", "true", "--model.d_model", "64", "--model.n_heads", "4", "--model.n_kv_heads", "4",
         "--model.ffn_hidden", "128", "--model.vocab_size", "256", "--train.seq_len", "32"]


@pytest.mark.parametrize("argv, world, needle", [  # needle: a regex
    (["--parallel.tp", "2"], 3, "world size 3 is not divisible by tp·cp·pp = 2·1·1"),
    (["--parallel.tp", "2", "--parallel.dp", "2"], 2, "world size 2 != tp·cp·dp·pp = 2·1·2·1 = 4"),
    (["--parallel.tp", "8"], 8, r"heads \(4 query, 4 kv\) are not divisible by --parallel.tp 8"),
    (["--parallel.tp", "4", "--model.n_kv_heads", "2"], 4, r"heads \(4 query, 2 kv\) are not divisible by --parallel.tp 4"),
    (["--parallel.tp", "4", "--model.vocab_size", "250"], 4,
     r"--model.vocab_size 250 is not divisible by --parallel.tp 4 .*set --model.vocab_size 252"),
    (["--parallel.tp", "4", "--parallel.sequence_parallel", "true", "--train.seq_len", "30"], 4,
     "with --parallel.sequence_parallel, seq_len/cp = 30 must be divisible by --parallel.tp 4"),
])
def test_wrong_grid_fails_with_one_clear_message(argv, world, needle):
    cfg = load_config(None, [*_TINY, *argv])
    with pytest.raises(ConfigError, match=needle):
        validate(cfg, world)


@pytest.mark.parametrize("argv, world", [
    (["--parallel.tp", "2"], 4),
    (["--parallel.tp", "4", "--parallel.sequence_parallel", "true"], 4),
    (["--parallel.tp", "2", "--parallel.dp", "2"], 4),
])
def test_good_grids_pass(argv, world):
    validate(load_config(None, [*_TINY, *argv]), world)
