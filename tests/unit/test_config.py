"""Config loading, overrides and validation: pure, no processes."""

import pytest

from megamod.config import ConfigError, load_config, parse_overrides, resolve_dp, validate

SYN = ["--data.synthetic", "true"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  flavour: 125m\n  n_layers: 6\ntrain:\n  seq_len: 512\n")
    cfg = load_config(str(path), ["--model.n_layers", "4", "--parallel.tp", "2", "--optim.lr", "1e-4"])
    assert cfg.model.flavour == "125m" and cfg.model.d_model == 768  # from the flavour
    assert cfg.model.n_layers == 4  # command line beats YAML beats flavour
    assert cfg.train.seq_len == 512 and cfg.parallel.tp == 2 and cfg.optim.lr == 1e-4


def test_list_and_bool_flags():
    cfg = load_config(None, ["--data.paths", "0.7", "a", "0.3", "b", "--mod.layers", "1,3", "--mod.enabled", "true",
                             "--parallel.sequence_parallel=false"])
    assert cfg.data.paths == ["0.7", "a", "0.3", "b"]
    assert cfg.mod.layers == [1, 3] and cfg.mod.enabled is True and cfg.parallel.sequence_parallel is False


def test_negative_number_is_a_value_not_a_flag():
    assert parse_overrides(["--parallel.dp", "-1"]) == {"parallel": {"dp": "-1"}}


@pytest.mark.parametrize("argv, needle", [
    (["--model.n_layer", "3"], "did you mean 'n_layers'"),
    (["--modle.n_layers", "3"], "did you mean 'model'"),
    (["--model.flavour", "7b"], "--model.flavour '7b' is unknown"),
    (["--train.dtype", "fp8"], "choose one of ['auto', 'fp32', 'bf16']"),
    (["--train.steps", "ten"], "--train.steps expects int"),
    (["--train.steps"], "--train.steps needs a value"),
    (["steps=3"], "overrides look like --section.field value"),
])
def test_bad_flags_name_the_fix(argv, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(None, argv)
    assert needle in str(e.value)


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


@pytest.mark.parametrize("argv, world, flag", [
    (["--parallel.tp", "3"], 3, "--parallel.tp 3"),  # 4 heads % 3
    (["--parallel.tp", "2", "--parallel.dp", "2"], 2, "--parallel.dp"),  # 2·2 != 2
    (["--parallel.tp", "2"], 3, "world size 3 is not divisible"),
    (["--model.n_heads", "3"], 1, "--model.n_heads 3"),
    (["--model.n_kv_heads", "3"], 1, "--model.n_kv_heads 3"),
    (["--parallel.cp", "2", "--train.seq_len", "250"], 2, "2·cp"),
    # MoBA under CP: chunks of whole blocks (256 / (2·2) = 64 is not a multiple of 48)
    (["--parallel.cp", "2", "--model.attention", "moba", "--moba.chunk_size", "48"], 2, "2·cp·moba.chunk_size"),
    (["--parallel.tp", "2", "--parallel.sequence_parallel", "true", "--train.seq_len", "255"], 2, "--parallel.tp 2"),
    (["--parallel.pp", "8"], 8, "fewer than --parallel.pp"),
    (["--train.seq_len", "8192"], 1, "--model.max_seq_len"),
    (["--mod.enabled", "true", "--mod.capacity", "1.5"], 1, "--mod.capacity"),
    (["--optim.zero_stage", "4"], 1, "--optim.zero_stage"),
    (["--train.bf16_mode", "master_fused", "--parallel.dp", "2"], 2, "--train.bf16_mode master_fused runs on one"),
    (["--train.bf16_mode", "master_fused", "--optim.zero_stage", "1"], 1, "at --optim.zero_stage 0"),
    (["--train.trailing_loss_tokens", "300"], 1, "--train.trailing_loss_tokens 300 must be in 0..--train.seq_len 256"),
    (["--train.trailing_loss_tokens", "8", "--parallel.pp", "2"], 2, "not supported with --parallel.pp > 1 or --parallel.cp > 1"),
])
def test_impossible_sizes(argv, world, flag):
    cfg = load_config(None, argv + SYN)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world)
    assert flag in str(e.value)


def test_no_data_names_the_flag():
    with pytest.raises(ConfigError, match="--data.paths"):
        validate(load_config(None, []), 1)


def test_dp_inferred_from_world():
    cfg = load_config(None, ["--parallel.tp", "2", "--parallel.pp", "2"] + SYN)
    validate(cfg, 16)
    assert resolve_dp(cfg, 16) == 4
