"""Config loading, overrides and validation: bad configs are refused with the numbers involved."""

import pytest

from conftest import CONFIGS, run_train
from megafusion.config import Config, ConfigError, load_config, save_config, validate


def test_example_configs_load_and_validate():
    for path in sorted(CONFIGS.glob("tiny_*.yaml")):
        cfg = load_config(path)
        validate(cfg, world_size=1)


def test_set_overrides_parse_types():
    cfg = load_config(CONFIGS / "tiny_text.yaml",
                      ["parallel.tp=2", "parallel.sp=true", "optimizer.lr=1e-4", "model.num_kv_heads=null",
                       "data.paths=[a, b]"])
    assert cfg.parallel.tp == 2 and cfg.parallel.sp is True
    assert cfg.optimizer.lr == pytest.approx(1e-4)
    assert cfg.model.num_kv_heads is None
    assert cfg.data.paths == ["a", "b"]


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "tiny_text_moe.yaml", ["train.steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override, expected", [
    ("model.hiden_size=8", "unknown config key 'model.hiden_size'. Did you mean 'model.hidden_size'?"),
    ("paralel.tp=2", "unknown config key 'paralel'. Did you mean 'parallel'?"),
    ("train.stpes=3", "Did you mean 'train.steps'?"),
])
def test_unknown_key_names_closest_valid_key(override, expected):
    with pytest.raises(ConfigError, match=expected.replace(".", r"\.").replace("?", r"\?")):
        load_config(CONFIGS / "tiny_text.yaml", [override])


def test_unknown_key_in_yaml_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  num_layer: 2\n")
    with pytest.raises(ConfigError, match=r"model\.num_layers.*bad\.yaml"):
        load_config(path)


def test_wrong_type_is_refused():
    with pytest.raises(ConfigError, match="train.steps' must be an integer, got 'many'"):
        load_config(None, ["train.steps=many"])
    with pytest.raises(ConfigError, match="parallel.sp' must be true or false"):
        load_config(None, ["parallel.sp=3"])


@pytest.mark.parametrize("overrides, world_size, message", [
    (["model.num_heads=6", "model.hidden_size=96", "parallel.tp=4"], 4,
     "model.num_heads = 6 is not divisible by parallel.tp = 4"),
    (["model.num_layers=3", "parallel.pp=2"], 2, "model.num_layers = 3 is not divisible by parallel.pp * vpp = 2"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by parallel.tp * parallel.pp = 2 * 1 = 2"),
    (["parallel.tp=2", "parallel.pp=2"], 2, "world size 2 is not divisible by parallel.tp * parallel.pp = 2 * 2 = 4"),
    (["parallel.sp=true"], 1, "parallel.sp = true needs parallel.tp >= 2"),
    (["train.global_batch_size=6", "train.micro_batch_size=2"], 2,
     "train.global_batch_size = 6 is not divisible by train.micro_batch_size * data-parallel size = 2 * 2"),
    (["parallel.ep=2"], 2, "parallel.ep = 2 needs a MoE model"),
    (["parallel.vpp=2"], 1, "parallel.vpp = 2 needs parallel.pp >= 2"),
    (["model.frame_positions=1d"], 1, "model.frame_positions = 1d has no effect with model.image_positions = 1d"),
    (["model.rope_layout=interleaved"], 1, "model.rope_layout = interleaved has no effect with model.image_positions"),
])
def test_impossible_layouts_are_refused_with_numbers(overrides, world_size, message):
    cfg = load_config(CONFIGS / "tiny_text.yaml", overrides)
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size)
    assert message in str(info.value)


def test_experts_not_divisible_by_ep():
    cfg = load_config(CONFIGS / "tiny_text_moe.yaml", ["model.moe.num_experts=3", "parallel.ep=2"])
    with pytest.raises(ConfigError, match="model.moe.num_experts = 3 is not divisible by parallel.ep = 2"):
        validate(cfg, 2)


def test_bad_choice_lists_the_options():
    cfg = load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match="train.precision = 'fp8' is not one of fp32, bf16, fp16"):
        validate(cfg, 1)


def test_defaults_are_valid():
    validate(Config(), world_size=1)


def test_cli_refuses_broken_config_before_starting(tmp_path):
    """Exit code 2, a message, and no run dir: nothing started."""
    proc = run_train(tmp_path / "run", "tiny_text.yaml", ["parallel.tp=3"], expect_rc=2)
    assert "model.num_heads = 4 is not divisible by parallel.tp = 3" in proc.stderr
    assert not (tmp_path / "run").exists()
