"""Config loading, overrides and validation: bad configs are refused with the numbers involved."""

import pytest

from conftest import CONFIGS, run_train
from megafusion.config import Config, ConfigError, load_config, save_config, validate


def test_example_configs_load_and_validate():
    """Every tiny example validates, but tiny_transfusion_indexed.yaml names placeholder files
    (data/mine/...): validate refuses it for those alone, each named by its key."""
    for path in sorted(CONFIGS.glob("tiny_*.yaml")):
        cfg = load_config(path)
        if cfg.data.kind != "indexed":
            validate(cfg, world_size=1)
            continue
        with pytest.raises(ConfigError) as info:
            validate(cfg, world_size=1)
        problems = str(info.value).split("\n  - ")[1:]
        assert problems[0].startswith(f"data.tokenizer = {cfg.data.tokenizer}: no such file")
        assert [p.split("(")[0] for p in problems[1:]] == [f"data.paths: no indexed dataset at {prefix}"
                                                           for prefix in cfg.data.paths]


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


def test_grouped_experts_with_tensor_parallelism_is_refused():
    # accepted here before, then a traceback from the model build
    cfg = load_config(CONFIGS / "tiny_text_moe.yaml", ["model.moe.experts=grouped", "parallel.tp=2"])
    with pytest.raises(ConfigError, match="model.moe.experts = grouped does not shard experts with tensor paral"):
        validate(cfg, 2)
    validate(load_config(CONFIGS / "tiny_text_moe.yaml", ["model.moe.experts=grouped", "parallel.ep=2"]), 2)


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


# --------------------------------------------------------------------------- values that train silently wrong


def _float_keys(cls=Config, prefix=""):
    """Dotted keys of every float field (float, float | None, float | str) of the config."""
    import dataclasses
    import typing

    keys = []
    for name, typ in typing.get_type_hints(cls).items():
        key = f"{prefix}{name}"
        if dataclasses.is_dataclass(typ):
            keys += _float_keys(typ, key + ".")
        elif typ is float or float in typing.get_args(typ):
            keys.append(key)
    return keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", ["nan", ".inf", "-inf"])
def test_every_non_finite_float_is_refused_naming_its_key(key, value):
    """NaN compares False with everything, so a range check like ``min_lr > lr`` let NaN
    through (``optimizer.clip_grad = nan`` trained unclipped and exited 0)."""
    config = "tiny_transfusion.yaml" if key.split(".")[0] in ("vision", "diffusion") else "tiny_text.yaml"
    # (FlowMatchingConfig refuses some at load, naming the section and field as flow.<field>)
    with pytest.raises(ConfigError, match=rf"{key.split('.')[-1]}.*(not a finite number|must)"):
        validate(load_config(CONFIGS / config, [f"{key}={value}"]), world_size=1)


def test_non_finite_message_names_the_value_and_the_default():
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / "tiny_text.yaml", ["optimizer.lr=nan"]), world_size=1)
    assert "optimizer.lr = nan is not a finite number; set a finite value (the default is 0.001)" in str(info.value)


def test_non_finite_mapping_values_are_refused():
    cfg = load_config(CONFIGS / "tiny_transfusion.yaml", ["data.shapes_weights={text: .nan, image_text: 1}"])
    with pytest.raises(ConfigError, match=r"data\.shapes_weights\.text = nan is not a finite number"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("config, overrides, message", [
    ("tiny_text.yaml", ["checkpoint.every=-1"], "checkpoint.every = -1 must be >= 0 (0: save only at the end)"),
    ("tiny_text.yaml", ["logging.every=0"], "logging.every = 0 must be >= 1"),
    ("tiny_text.yaml", ["optimizer.lr=-1e-3"], "optimizer.lr = -0.001 must be >= 0"),
    ("tiny_text.yaml", ["optimizer.min_lr=-1e-4"], "optimizer.min_lr = -0.0001 must be >= 0"),
    ("tiny_text.yaml", ["optimizer.beta2=1"], "optimizer.beta2 = 1.0 must be in [0, 1)"),
    ("tiny_text.yaml", ["optimizer.weight_decay=-0.1"], "optimizer.weight_decay = -0.1 must be >= 0"),
    ("tiny_text.yaml", ["optimizer.clip_grad=-1"], "optimizer.clip_grad = -1.0 must be >= 0 (0 disables clipping)"),
    ("tiny_text.yaml", ["train.max_skipped_steps=-1"], "train.max_skipped_steps = -1 must be >= 0"),
    ("tiny_text.yaml", ["schedule.warmup_steps=-2"], "schedule.warmup_steps = -2 must be >= 0"),
    ("tiny_text.yaml", ["model.rope_base=0"], "model.rope_base = 0.0 must be > 1"),
    ("tiny_text_moe.yaml", ["model.moe.aux_loss_coeff=-0.01"], "model.moe.aux_loss_coeff = -0.01 must be >= 0"),
    ("tiny_transfusion.yaml", ["diffusion.loss_weight=-1"], "diffusion.loss_weight = -1.0 must be >= 0"),
    ("tiny_transfusion.yaml", ["data.shapes_weights={text: -1, image_text: 1}"],
     "data.shapes_weights = {'text': -1.0, 'image_text': 1.0} must be non-negative"),
    ("tiny_transfusion.yaml", ["data.kind=indexed", "data.paths=[a, b]", "data.tokenizer=t.model",
                               "data.weights=[-1, 2]"], "data.weights = [-1.0, 2.0] must be non-negative"),
])
def test_out_of_range_values_are_refused(config, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / config, overrides), world_size=1)
    assert message in str(info.value)


def test_max_skipped_steps_accepts_null_and_zero():
    for value in ("null", "0", "5"):
        validate(load_config(CONFIGS / "tiny_text.yaml", [f"train.max_skipped_steps={value}"]), world_size=1)


@pytest.mark.parametrize("overrides, message", [
    (["optimizer.lr=nan"], "optimizer.lr = nan is not a finite number"),
    (["optimizer.clip_grad=nan"], "optimizer.clip_grad = nan is not a finite number"),
    (["checkpoint.every=-1"], "checkpoint.every = -1 must be >= 0"),
    (["model.seq_length=10000000"], "model.seq_length = 10000000"),
    (["vision.representation=rae"], "vision.representation = rae has no effect with model.kind = text"),
])
def test_cli_refuses_silently_wrong_values_before_starting(tmp_path, overrides, message):
    """Each of these used to start: lr = nan ended in torch's traceback, clip_grad = nan
    trained unclipped and exited 0, every = -1 saved at every step, the text model's RAE
    was ignored, and 10M positions would need petabytes."""
    proc = run_train(tmp_path / "run", "tiny_text.yaml", overrides, expect_rc=2)
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- the memory guard


def test_absurd_seq_length_is_refused_with_both_numbers():
    """10M positions: the attention scores alone are petabytes. The message gives the
    estimate and this machine's memory in GiB, and what to change."""
    cfg = load_config(CONFIGS / "tiny_text.yaml", ["model.seq_length=10000000"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=1)
    text = str(info.value)
    assert "model.seq_length = 10000000" in text and "train.micro_batch_size = 2" in text
    assert "GiB per process" in text and "GiB; lower model.seq_length" in text and "raise parallel.tp" in text
    assert "\n" not in text


def test_memory_guard_compares_the_estimate_with_the_device(monkeypatch):
    from megafusion.training import memory

    cfg = load_config(CONFIGS / "tiny_text.yaml", ["model.seq_length=4096"])
    need = memory.estimate_training_memory(cfg, 1, "cpu").total
    monkeypatch.setattr(memory, "device_memory", lambda cfg: (need + 1, "this machine's RAM is", "cpu"))
    validate(cfg, world_size=1)
    monkeypatch.setattr(memory, "device_memory", lambda cfg: (need - 1, "this machine's RAM is", "cpu"))
    with pytest.raises(ConfigError, match=rf"needs about {need / 2**30:.1f} GiB per process .* this machine's RAM is "
                                          rf"{(need - 1) / 2**30:.1f} GiB"):
        validate(cfg, world_size=1)


def test_memory_estimate_follows_korthikanti_and_the_fixes_it_names():
    """Activations per layer s*b*h*(10 + 24/t) + 5*a*s^2*b/t bytes in 16-bit (Korthikanti et
    al. 2022, eq. 2-3), twice that in fp32; each suggested fix lowers the estimate."""
    from megafusion.training.memory import estimate_training_memory

    base = ["model.seq_length=2048", "model.num_heads=4", "model.num_kv_heads=4"]
    est = estimate_training_memory(load_config(CONFIGS / "tiny_text.yaml", base + ["train.precision=bf16"]), 1, "cpu")
    s, b, h, a, layers = 2048, 2, 64, 4, 4
    assert est.activations == layers * (s * b * h * 34 + 5 * a * s * s * b)
    assert est.logits == s * b * 256 * 4
    fp32 = estimate_training_memory(load_config(CONFIGS / "tiny_text.yaml", base), 1, "cpu")
    assert fp32.activations == 2 * est.activations

    tp2 = estimate_training_memory(load_config(CONFIGS / "tiny_text.yaml", base + ["parallel.tp=2"]), 2, "cpu")
    assert tp2.activations == 2 * layers * (s * b * h * (10 + 24 / 2) + 5 * a * s * s * b / 2)
    for fix in ("train.micro_batch_size=1", "train.recompute=full", "model.seq_length=1024"):
        lower = estimate_training_memory(load_config(CONFIGS / "tiny_text.yaml", base + [fix]), 1, "cpu")
        assert lower.total < fp32.total, fix


def test_memory_on_cpu_is_shared_by_the_processes_of_a_node(monkeypatch):
    import psutil

    from megafusion.training.memory import device_memory

    cfg = load_config(CONFIGS / "tiny_text.yaml", ["train.device=cpu"])
    assert device_memory(cfg)[0] == psutil.virtual_memory().total
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device_memory(cfg)[0] == psutil.virtual_memory().total // 4


# --------------------------------------------------------------------------- settings the model kind ignores


TRANSFUSION_ONLY = [
    "model.attention=flex", "model.ffn=modality", "model.time_conditioning=adaln", "model.image_positions=2d",
    "model.patch_positions=learned", "model.patch_position_init_std=3", "model.frame_conditioning=window",
    "model.action_conditioning=embedding", "vision.image_size=64", "vision.representation=vae",
    "diffusion.prediction=v", "diffusion.loss_weight=1", "data.shapes_world=simple",
    "data.shapes_weights={text: 1, image_text: 0}",
]


@pytest.mark.parametrize("override", TRANSFUSION_ONLY)
def test_text_model_refuses_transfusion_settings(override):
    """The text model is megatron's GPT: none of these reach it, and a run that ignores
    what it was told is silently not the run that was asked for."""
    key, value = override.split("=", 1)
    with pytest.raises(ConfigError, match=rf"{key.replace('.', '[.]')} = .* has no effect with model\.kind = text"):
        validate(load_config(CONFIGS / "tiny_text.yaml", [override]), world_size=1)
    # the same setting is one the Transfusion model reads
    validate(load_config(CONFIGS / "tiny_transfusion.yaml", [override]), world_size=1)


def test_text_model_refuses_per_modality_shared_experts():
    cfg = load_config(CONFIGS / "tiny_text_moe.yaml", ["model.moe.shared_expert_ffn_hidden_size=64",
                                                       "model.moe.per_modality_shared_experts=true"])
    with pytest.raises(ConfigError, match=r"model\.moe\.per_modality_shared_experts = True has no effect"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("config, overrides, message", [
    ("tiny_text.yaml", ["data.kind=shapes"], "data.kind = shapes is multimodal and model.kind = text reads text only"),
    ("tiny_transfusion.yaml", ["data.kind=synthetic"],
     "data.kind = synthetic is text only and the Transfusion model needs images"),
    ("tiny_text.yaml", ["data.kind=indexed", "data.tokenizer=t.model"], "data.kind = indexed needs data.paths"),
    ("tiny_transfusion.yaml", ["data.kind=indexed", "data.paths=[a]"], "data.kind = indexed needs data.tokenizer"),
    ("tiny_text.yaml", ["data.tokenizer=t.model"], "data.tokenizer = t.model has no effect with data.kind = synthetic"),
    ("tiny_transfusion.yaml", ["data.paths=[a]"], "data.paths = ['a'] has no effect with data.kind = shapes"),
    # ShapesWorld renders 32 or 64 pixels; 256 was accepted here and failed with a traceback at build
    ("tiny_transfusion.yaml", ["vision.image_size=256", "vision.patch_size=16"],
     "vision.image_size = 256: ShapesWorld (data.kind = shapes) renders 32 or 64 pixel images"),
])
def test_data_kind_settings_are_checked_before_starting(config, overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / config, overrides), world_size=1)
    assert message in str(info.value)


# ShapesWorld settings (read only by ShapesStream, data.kind = shapes), each set to a value
# other than its default; tiny_transfusion.yaml's own ones back to the defaults, so a case sets one.
SHAPES_SETTINGS = ["data.shapes_weights={text: 1, image_text: 0}", "data.shapes_world=simple",
                   "data.shapes_holdout=compositions"]
SHAPES_DEFAULTS = ["data.shapes_weights={text: 1.0, image_text: 1.0, video: 0.0, action_video: 0.0}",
                   "data.shapes_world=full", "data.shapes_holdout=none"]


@pytest.mark.parametrize("kind", ["indexed", "energon"])
@pytest.mark.parametrize("override", SHAPES_SETTINGS)
def test_shapes_settings_are_refused_with_data_that_is_not_generated(kind, override):
    """Indexed and Energon data are what their files hold: a ShapesWorld mixture, vocabulary or
    held-out split set beside them was silently ignored (the run was not the one asked for)."""
    key = override.split("=", 1)[0]
    base = [*SHAPES_DEFAULTS, f"data.kind={kind}", "data.paths=[a]", "data.tokenizer=t.model"]
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / "tiny_transfusion.yaml", [*base, override]), world_size=1)
    text = str(info.value)
    line = next(p for p in text.split("\n  - ") if p.startswith(f"{key} = "))
    assert f"has no effect with data.kind = {kind} (a ShapesWorld setting" in line
    assert line.endswith("remove it or set data.kind = shapes")
    assert [k for k in ("data.shapes_weights", "data.shapes_world", "data.shapes_holdout") if f"{k} = " in text] == [key]
    # the same data with the defaults: no ShapesWorld key is named (only what was set counts)
    with pytest.raises(ConfigError) as info:  # (data/a and t.model are placeholders)
        validate(load_config(CONFIGS / "tiny_transfusion.yaml", base), world_size=1)
    assert "data.shapes_" not in str(info.value)


@pytest.mark.parametrize("override", SHAPES_SETTINGS)
def test_shapes_settings_are_accepted_with_shapes_data(override):
    validate(load_config(CONFIGS / "tiny_transfusion.yaml", [*SHAPES_DEFAULTS, override]), world_size=1)


@pytest.mark.parametrize("model_kind", ["text", "transfusion"])
@pytest.mark.parametrize("data_kind", ["synthetic", "indexed", "shapes", "energon"])
def test_default_shapes_settings_are_accepted_with_every_data_kind(model_kind, data_kind):
    """The defaults, even written out, are no setting: validate may refuse the combination
    for other reasons (a kind the model cannot read, missing paths), never for these keys."""
    from megafusion.config import DataConfig, choices_of, config_fields

    kinds = dict((key, choices_of(typ)) for key, _, typ in config_fields(Config()))["data.kind"]
    assert sorted(kinds) == sorted(["synthetic", "indexed", "shapes", "energon"])  # every kind is covered
    assert DataConfig().shapes_weights == {"text": 1.0, "image_text": 1.0, "video": 0.0, "action_video": 0.0}
    cfg = load_config(None, [f"model.kind={model_kind}", f"data.kind={data_kind}", *SHAPES_DEFAULTS])
    try:
        validate(cfg, world_size=1)
    except ConfigError as err:
        assert "data.shapes_" not in str(err)


def test_a_shapes_setting_is_named_once():
    """The text model refuses it as a Transfusion setting, not a second time for its data kind;
    with a data kind the Transfusion model cannot read, that kind is the problem."""
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / "tiny_text.yaml", ["data.shapes_holdout=compositions"]), world_size=1)
    assert str(info.value).count("data.shapes_holdout = ") == 1
    assert "has no effect with model.kind = text" in str(info.value)
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / "tiny_transfusion.yaml", ["data.kind=synthetic"]), world_size=1)
    assert "data.kind = synthetic is text only" in str(info.value) and "data.shapes_" not in str(info.value)


# --------------------------------------------------------------------------- choices are types, every problem at once


def _choice_keys():
    from megafusion.config import choices_of, config_fields

    return [(key, choices_of(typ)) for key, _, typ in config_fields(Config()) if choices_of(typ) is not None]


def test_choices_come_from_literal_annotations():
    import megafusion.config as config

    assert not hasattr(config, "_CHOICES")
    keys = dict(_choice_keys())
    assert keys["train.precision"] == ("fp32", "bf16", "fp16")
    assert keys["model.kind"] == ("text", "transfusion") and keys["diffusion.prediction"] == ("x", "v", "eps")
    assert len(keys) >= 26  # every choice of the former _CHOICES table, and diffusion.prediction


@pytest.mark.parametrize("key, choices", _choice_keys())
def test_every_choice_outside_its_list_is_refused_naming_the_choices(key, choices):
    # (FlowMatchingConfig refuses its own at load, as flow.<field>)
    with pytest.raises(ConfigError, match=rf"{key.split('.')[-1]}.*(is not one of|choose one of)") as info:
        validate(load_config(None, [f"{key}=bogus"]), world_size=1)
    if not key.startswith("diffusion."):
        assert f"{key} = 'bogus' is not one of {', '.join(choices)}" in str(info.value)


def test_choice_of_the_wrong_type_is_refused_at_load():
    with pytest.raises(ConfigError, match=r"config key 'train\.fp8' must be one of none, delayed, tensorwise, mxfp8, "
                                          r"got None"):
        load_config(None, ["train.fp8=null"])


def test_time_shift_is_auto_or_a_number():
    assert load_config(None, ["diffusion.time_shift=auto"]).diffusion.time_shift == "auto"
    assert load_config(None, ["diffusion.time_shift=2"]).diffusion.time_shift == 2.0
    assert load_config(None, ["diffusion.time_shift=1e-1"]).diffusion.time_shift == pytest.approx(0.1)
    with pytest.raises(ConfigError, match=r"'diffusion\.time_shift' must be auto or number, got 'fast'"):
        load_config(None, ["diffusion.time_shift=fast"])


def test_validate_reports_every_problem_in_one_message():
    """Choices, non-finite values, minimums, layouts, data and checkpoint settings together:
    one run of validate names them all (it used to stop after the value checks)."""
    cfg = load_config(CONFIGS / "tiny_text.yaml", ["train.precision=fp8", "optimizer.lr=nan", "model.num_layers=0",
                                                   "model.num_heads=3", "parallel.sp=true", "data.prefetch=0",
                                                   "checkpoint.keep=0", "data.tokenizer=t.model"])
    with pytest.raises(ConfigError) as info:
        validate(cfg, world_size=1)
    text = str(info.value)
    for message in ("train.precision = 'fp8' is not one of fp32, bf16, fp16", "optimizer.lr = nan is not a finite",
                    "model.num_layers = 0 must be at least 1",
                    "model.hidden_size = 64 is not divisible by model.num_heads = 3",
                    "parallel.sp = true needs parallel.tp >= 2", "data.prefetch = 0 must be >= 1",
                    "checkpoint.keep = 0 must be at least 1", "data.tokenizer = t.model has no effect"):
        assert message in text
    assert text.count("\n  - ") == 8


@pytest.mark.parametrize("overrides, absent", [
    (["parallel.tp=0", "checkpoint.keep=0"], "divisible by parallel.tp"),  # no division by the refused 0
    (["model.num_heads=0", "checkpoint.keep=0"], "divisible by model.num_heads"),
    (["data.kind=bogus", "data.tokenizer=t.model", "checkpoint.keep=0"], "has no effect with data.kind"),
    (["model.rope_layout=bogus", "checkpoint.keep=0"], "has no effect with model.image_positions"),
    (["train.fp8=bogus", "checkpoint.keep=0"], "needs model.spec = te"),
])
def test_checks_that_read_a_refused_value_are_skipped(overrides, absent):
    with pytest.raises(ConfigError) as info:
        validate(load_config(CONFIGS / "tiny_text.yaml", overrides), world_size=2)
    text = str(info.value)
    assert "checkpoint.keep = 0 must be at least 1" in text and absent not in text


# --------------------------------------------------------------------------- what the named files say (issue 25)
# These used to be refused by the recipes, when the provider was built: after the process
# groups existed. validate reads the files' metadata instead, with no process group.


def _refused_by_validate(config, overrides, message):
    """validate refuses config + overrides naming ``message``, and accepts config alone, with
    no process group before or after."""
    import torch.distributed

    validate(load_config(config, overrides[:-1] if isinstance(overrides, tuple) else []), world_size=1)
    with pytest.raises(ConfigError) as info:
        validate(load_config(config, list(overrides)), world_size=1)
    assert message in str(info.value)
    assert not torch.distributed.is_initialized()
    return str(info.value)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A real sentencepiece tokenizer, and an indexed text dataset made with it (its files
    are empty: validate reads only whether they are there and the dataset's meta.json)."""
    import json

    from megafusion.data.tokenizer import Tokenizer, train_tokenizer

    root = tmp_path_factory.mktemp("text_data")
    (root / "corpus.txt").write_text("the red circle moves to the left of the big blue square .\n" * 50)
    model = train_tokenizer([root / "corpus.txt"], root / "tok", vocab_size=300)
    vocab = Tokenizer(model).vocab_size
    prefix = root / "docs"
    for suffix in (".bin", ".idx"):
        (root / f"docs{suffix}").write_bytes(b"")
    (root / "docs.meta.json").write_text(json.dumps({"kind": "text", "vocab_size": vocab,
                                                     "tokenizer_model": str(model)}))
    return model, vocab, prefix


def _text_indexed(text_data, *extra):
    model, vocab, prefix = text_data
    padded = -(-vocab // 64) * 64
    return [f"model.vocab_size={padded}", "data.kind=indexed", f"data.paths=[{prefix}]", f"data.tokenizer={model}",
            *extra]


@pytest.mark.parametrize("config, kind, message", [
    ("tiny_text.yaml", "shapes", "data.kind = shapes is multimodal and model.kind = text reads text only"),
    ("tiny_transfusion.yaml", "synthetic", "data.kind = synthetic is text only and the Transfusion model needs images"),
])
def test_validate_refuses_a_data_kind_the_model_cannot_read(config, kind, message):
    _refused_by_validate(CONFIGS / config, ("train.steps=10", f"data.kind={kind}"), message)


def test_validate_refuses_a_vocab_smaller_than_the_byte_tokenizer():
    """ShapesWorld with data.tokenizer = null: the byte tokenizer's 266 tokens."""
    _refused_by_validate(CONFIGS / "tiny_transfusion.yaml", ("train.steps=10", "model.vocab_size=256"),
                         "model.vocab_size = 256 is smaller than the tokenizer's 266 tokens")


def test_validate_refuses_a_vocab_smaller_than_the_sentencepiece_tokenizer(text_data):
    _, vocab, _ = text_data
    assert vocab > 256
    overrides = _text_indexed(text_data)
    text = _refused_by_validate(CONFIGS / "tiny_text.yaml", (*overrides, "model.vocab_size=256"),
                                f"model.vocab_size = 256 is smaller than the tokenizer's {vocab} tokens")
    assert "set model.vocab_size >= " in text


@pytest.mark.parametrize("tp, padded", [(1, 384), (2, 512)])
def test_vocab_size_null_pads_the_tokenizers_size_as_megatron(text_data, tp, padded):
    """model.vocab_size: null -> the tokenizer's ids (added specials included) rounded up to a
    multiple of 128 * parallel.tp (Megatron's make_vocab_size_divisible_by): the byte
    tokenizer's 266 ids and a sentencepiece model's."""
    cfg = load_config(CONFIGS / "tiny_transfusion.yaml", ["model.vocab_size=null", f"parallel.tp={tp}"])
    assert cfg.model.vocab_size == padded  # 266 byte-tokenizer ids
    _, vocab, _ = text_data
    cfg = load_config(CONFIGS / "tiny_text.yaml", [*_text_indexed(text_data), "model.vocab_size=null"])
    assert cfg.model.vocab_size == -(-vocab // 128) * 128 and cfg.model.vocab_size >= vocab
    validate(cfg, 1)


def test_vocab_size_null_with_an_unreadable_tokenizer_is_refused_naming_it(tmp_path):
    missing = tmp_path / "none.model"
    text = _refused_by_validate(CONFIGS / "tiny_transfusion.yaml",
                                ("train.steps=10", "model.vocab_size=null", f"data.tokenizer={missing}"),
                                "model.vocab_size = null (the tokenizer's size, padded) needs a readable data.tokenizer")
    assert str(missing) in text


def test_validate_refuses_a_dataset_made_with_a_bigger_tokenizer(text_data, tmp_path):
    """data.tokenizer fits model.vocab_size, but the dataset holds ids of a 1000-token one."""
    import json
    import shutil

    _, _, prefix = text_data
    other = tmp_path / "docs"
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prefix}{suffix}", f"{other}{suffix}")
    (tmp_path / "docs.meta.json").write_text(json.dumps({"kind": "text", "vocab_size": 1000,
                                                         "tokenizer_model": "big.model"}))
    overrides = _text_indexed(text_data)
    _refused_by_validate(CONFIGS / "tiny_text.yaml", (*overrides, f"data.paths=[{other}]"),
                         f"data.paths: {other} was preprocessed with a 1000-token tokenizer (big.model), more than "
                         f"model.vocab_size = {overrides[0].split('=')[1]}")


def test_validate_refuses_images_in_the_text_models_data(text_data, tmp_path):
    import shutil

    _, _, prefix = text_data
    other = tmp_path / "captions"
    for suffix in (".bin", ".idx", ".meta.json"):
        shutil.copy(f"{prefix}{suffix}", f"{other}{suffix}")
    (tmp_path / "captions.layout.npy").write_bytes(b"")
    _refused_by_validate(CONFIGS / "tiny_text.yaml", (*_text_indexed(text_data), f"data.paths=[{other}]"),
                         f"data.paths: {other} holds images or video (text data); model.kind = text reads text only")


@pytest.mark.parametrize("key, message", [
    ("data.tokenizer", "data.tokenizer = {missing}: no such file"),
    ("data.paths", "data.paths: no indexed dataset at {missing}(.bin/.idx)"),
])
def test_validate_names_a_missing_data_file_by_its_key(text_data, tmp_path, key, message):
    missing = tmp_path / "no_such_file"
    value = f"[{missing}]" if key == "data.paths" else missing
    _refused_by_validate(CONFIGS / "tiny_text.yaml", (*_text_indexed(text_data), f"{key}={value}"),
                         message.format(missing=missing))


def _saved_rae(directory, tokens):
    """A representation.json as megafusion train-decoder writes it (no weights: validate
    reads the manifest only)."""
    import json

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "representation.json").write_text(json.dumps({
        "kind": "rae", "config": {"image_size": 32}, "tokens_per_image": tokens, "latent_dim": 12, "image_size": 32}))
    return directory


@pytest.mark.parametrize("setting, message", [
    ("model.image_positions=2d", "model.image_positions = 2d needs square patch grids; the representation has 8 "
                                 "tokens per image"),
    ("model.image_positions=3d", "model.image_positions = 3d needs square patch grids"),
    ("model.frame_conditioning=window", "model.frame_conditioning = window needs square patch grids; the "
                                        "representation has 8 tokens per image (use previous)"),
])
def test_validate_refuses_settings_that_need_square_patch_grids(tmp_path, setting, message):
    square, oblong = _saved_rae(tmp_path / "square", 16), _saved_rae(tmp_path / "oblong", 8)
    rae = ["vision.representation=rae", "vision.image_size=32"]
    validate(load_config(CONFIGS / "tiny_transfusion.yaml", [*rae, f"vision.path={square}", setting]), world_size=1)
    _refused_by_validate(CONFIGS / "tiny_transfusion.yaml", (*rae, f"vision.path={oblong}", setting), message)


def test_validate_names_a_missing_representation_by_its_key(tmp_path):
    missing = tmp_path / "no_such_rae"
    _refused_by_validate(CONFIGS / "tiny_transfusion.yaml", ("vision.representation=rae", f"vision.path={missing}"),
                         f"vision.path = {missing}: no such directory")


def test_validate_refuses_pixel_patches_that_do_not_tile_the_image():
    _refused_by_validate(CONFIGS / "tiny_transfusion.yaml", ("train.steps=10", "vision.patch_size=5"),
                         "vision.image_size = 32 is not divisible by vision.patch_size = 5")


def test_recipes_refuse_with_validates_messages():
    """A provider built without validate (a test's, a library user's) gets validate's refusal."""
    from megafusion.config import provider_problems, require_provider_config

    cfg = load_config(CONFIGS / "tiny_transfusion.yaml", ["model.vocab_size=256"])
    with pytest.raises(ConfigError) as info:
        require_provider_config(cfg)
    assert str(info.value) == "invalid config: " + provider_problems(cfg)[0]


@pytest.mark.parametrize("override, message", [
    ("data.tokenizer_type=HuggingFaceTokenizer",
     "data.tokenizer_type = HuggingFaceTokenizer has no effect without data.tokenizer"),
    ("logging.sample_steps=5", "logging.sample_steps = 5 has no effect with logging.sample_every = 0"),
    ("logging.sample_prompts=[a red square]",
     "logging.sample_prompts = ['a red square'] has no effect with logging.sample_every = 0"),
    ("logging.wandb.mode=offline", "logging.wandb.mode = offline has no effect without logging.wandb.project"),
])
def test_validate_refuses_settings_the_chosen_path_ignores(override, message):
    """Each of these was accepted and silently ignored: the byte tokenizer reads no type, no
    sample grid reads prompts or steps, no W&B run reads a mode."""
    _refused_by_validate(CONFIGS / "tiny_transfusion.yaml", ("train.steps=10", override), message)
