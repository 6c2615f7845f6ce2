"""Exports that others load (issue 27): ``megafusion export --format hf-llama`` of tiny text runs
trained at TP2 and PP2 loads in ``transformers.AutoModelForCausalLM`` offline with the logits
of megafusion's model (1e-4, fp32) and imports back to the same logits; a Transfusion or
non-Llama text run is refused with the reason; the fused layouts (QKV per query group,
gate/up in linear_fc1, TE fused norms, grouped experts) map as docs/interop.md says; the
first config.json layout still loads; bad paths and flags are one line and exit 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import CONFIGS, REPO, run_train

FAST = ["train.steps=2", "schedule.warmup_steps=1", "checkpoint.every=2", "logging.tensorboard=false",
        "model.num_kv_heads=2"]
RUNS = {  # name: layout overrides (PP2 also unties the embeddings and moves the RoPE base)
    "tp2": ["parallel.tp=2"],
    "pp2": ["parallel.pp=2", "model.tie_embeddings=false", "model.rope_base=5000"],
}

# transformers runs in a child whose working directory is not the repository (whose top-level
# kernels/ folder would shadow Hugging Face's `kernels` package), offline.
HF_LOGITS = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, local_files_only=True)
assert type(model).__name__ == "LlamaForCausalLM", type(model)
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])).logits, sys.argv[3])
"""


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "megafusion.cli", *args], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})


def one_line_exit_2(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.strip()]
    assert line.startswith(f"megafusion {command}:"), line
    return line


def hf_logits(directory: Path, tokens: torch.Tensor, tmp: Path) -> torch.Tensor:
    torch.save(tokens, tmp / "tokens.pt")
    proc = subprocess.run([sys.executable, "-c", HF_LOGITS, str(directory), str(tmp / "tokens.pt"),
                           str(tmp / "logits.pt")], capture_output=True, text=True, cwd=tmp,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    return torch.load(tmp / "logits.pt")


@torch.no_grad()
def megafusion_logits(run_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from megafusion.inference.loading import load_run

    with load_run(run_dir, device="cpu", kinds=None) as loaded:
        positions = torch.arange(tokens.shape[1]).expand_as(tokens)
        return loaded.model(tokens, positions, None)


TOKENS = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hf_llama")


def trained(name: str, base: Path) -> tuple[Path, Path]:
    """(run dir, --format hf-llama export) of RUNS[name], trained with torchrun (2 processes) once."""
    run_dir, out = base / name / "run", base / name / "hf"
    if not (run_dir / "checkpoints" / "step_00000002").is_dir():
        run_train(run_dir, "tiny_text.yaml", [*FAST, *RUNS[name]], nproc=2)
    if not (out / "config.json").is_file():
        proc = cli("export", "--run-dir", str(run_dir), "--out", str(out), "--format", "hf-llama")
        assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir, out


@pytest.mark.distributed
@pytest.mark.parametrize("name", list(RUNS))
def test_hf_llama_export_loads_in_transformers_with_equal_logits(name, base, tmp_path, cpu_layer):
    run_dir, out = trained(name, base)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["tie_word_embeddings"] == (name == "tp2")
    assert config["rope_theta"] == (5000.0 if name == "pp2" else 10000.0)
    assert config["megafusion"]["config"]["parallel"][name[:2]] == 2
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        keys = set(f.keys())
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.3.self_attn.q_proj.weight",
            "model.layers.3.self_attn.k_proj.weight", "model.layers.3.mlp.gate_proj.weight"} <= keys
    assert ("lm_head.weight" in keys) == (name == "pp2")
    want = megafusion_logits(run_dir, TOKENS)
    got = hf_logits(out, TOKENS, tmp_path)
    assert got.shape == want.shape == (2, 64, 256)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.distributed
def test_import_of_a_hf_llama_export_round_trips(base, tmp_path, cpu_layer):
    from megafusion.interop.import_ import import_export

    run_dir, out = trained("pp2", base)
    import_export(out, tmp_path / "imported")
    want = megafusion_logits(run_dir, TOKENS)
    torch.testing.assert_close(megafusion_logits(tmp_path / "imported", TOKENS), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(megafusion_logits(out, TOKENS), want, rtol=0, atol=1e-6)  # generate/eval read it too
    # A Llama from elsewhere (no megafusion section) imports as a text model with the same logits.
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copy(out / "model.safetensors", plain / "model.safetensors")
    raw = json.loads((out / "config.json").read_text())
    raw.pop("megafusion")
    (plain / "config.json").write_text(json.dumps(raw))
    import_export(plain, tmp_path / "from_plain", overrides=["model.seq_length=64"])
    torch.testing.assert_close(megafusion_logits(tmp_path / "from_plain", TOKENS), want, rtol=0, atol=1e-6)


@pytest.mark.distributed
def test_hf_llama_sharded_export_has_the_hf_index(base, tmp_path):
    run_dir, _ = trained("tp2", base)
    proc = cli("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "x"), "--format", "hf-llama",
               "--max-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr[-3000:]
    index = json.loads((tmp_path / "x" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for f in files
                                                  for t in load_file(str(tmp_path / "x" / f)).values())
    whole = load_file(str(base / "tp2" / "hf" / "model.safetensors"))
    assert sorted(index["weight_map"]) == sorted(whole)
    assert "it/s" not in proc.stderr and "B/s" not in proc.stderr  # no progress bar when stderr is not a terminal


def run_dir_with_config(tmp_path: Path, config: str, **model) -> Path:
    """A run dir with only config.yaml: --format hf-llama refuses before loading any checkpoint."""
    import yaml

    tree = yaml.safe_load((CONFIGS / config).read_text())
    tree["model"].update(model)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(tree))
    return run_dir


@pytest.mark.parametrize("config, model, reason", [
    ("tiny_transfusion.yaml", {}, "model.kind = 'transfusion': a Transfusion model"),
    ("tiny_text.yaml", {"activation": "gelu"}, "model.activation = 'gelu' (Llama's MLP is SwiGLU"),
    ("tiny_text.yaml", {"normalization": "layernorm"}, "model.normalization = 'layernorm' (Llama uses RMSNorm"),
    ("tiny_text_moe.yaml", {}, "MoE is not Llama-shaped"),
])
def test_hf_llama_refuses_models_that_are_not_llama_shaped(config, model, reason, tmp_path):
    run_dir = run_dir_with_config(tmp_path, config, **model)
    line = one_line_exit_2(cli("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"),
                               "--format", "hf-llama"), "export")
    assert reason in line and "--format hf-llama needs a Llama-shaped text model" in line
    assert not (tmp_path / "o").exists()


def test_wrong_directories_and_flags_are_one_line_exit_2(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    run_dir = run_dir_with_config(tmp_path, "tiny_text.yaml")
    cases = [
        (("export", "--run-dir", str(tmp_path / "export"), "--out", str(tmp_path / "o")), "is an export"),
        (("export", "--run-dir", str(run_dir), "--out", str(run_dir)), "is a run dir"),
        (("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"), "--step", "-1"), "--step -1"),
        (("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"), "--step", "7"), "has no complete"),
        (("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"), "--dtype", "fp16"), "--dtype"),
        (("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"), "--format", "onnx"), "--format"),
        (("export", "--run-dir", str(run_dir), "--out", str(tmp_path / "o"), "--max-shard-size", "0"),
         "must be more than 0"),
        (("import", "--from", str(run_dir), "--run-dir", str(tmp_path / "r")), "is a run dir (config.yaml)"),
        (("import", "--from", str(tmp_path / "export"), "--run-dir", str(tmp_path / "r")), "model_type = 'gpt2'"),
        (("import", "--from", str(tmp_path / "export"), "--run-dir", str(tmp_path / "export")), "is an export"),
        (("import", "--run-dir", str(tmp_path / "r")), "--from"),
    ]
    for args, text in cases:
        line = one_line_exit_2(cli(*args), args[0])
        assert text in line, (args, line)


def test_sizes_are_hugging_face_units():
    from megafusion.interop.safetensors_io import parse_size

    assert parse_size("5GB") == 5 * 10**9 and parse_size("40KB") == 40_000 and parse_size("2GiB") == 2 << 30
    assert parse_size("123") == 123 and parse_size(1000) == 1000 and parse_size("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="is not a size"):
        parse_size("big")


# ---- the mappings, on made-up tensors (no training)

def text_cfg(**model):
    from megafusion.config import load_config

    return load_config(CONFIGS / "tiny_text.yaml", [f"model.{k}={v}" for k, v in model.items()])


def test_qkv_is_grouped_by_query_group_and_fc1_is_gate_then_up():
    from megafusion.interop import hf_llama

    cfg = text_cfg(num_kv_heads=2)  # 4 query heads in 2 groups, head dim 16, hidden 64, ffn 128
    r, groups, d, h = 2, 2, 16, 64
    # Row i of linear_qkv: group g, slot s (0..r-1 query heads, r key, r+1 value), dim j; fill with an id
    slots = torch.arange(groups * (r + 2) * d, dtype=torch.float32).reshape(groups, r + 2, d)
    qkv = slots.reshape(-1, 1).expand(-1, h).clone()
    fc1 = torch.arange(2 * 128, dtype=torch.float32).reshape(-1, 1).expand(-1, h).clone()
    got = hf_llama.to_hf({"decoder.layers.0.self_attention.linear_qkv.weight": qkv,
                          "decoder.layers.0.mlp.linear_fc1.weight": fc1}, cfg)
    q, k, v = (got[f"model.layers.0.self_attn.{x}_proj.weight"][:, 0] for x in "qkv")
    for head in range(4):  # HF query head `head` uses key/value head head // r
        assert torch.equal(q[head * d:(head + 1) * d], slots[head // r, head % r])
    for g in range(groups):
        assert torch.equal(k[g * d:(g + 1) * d], slots[g, r]) and torch.equal(v[g * d:(g + 1) * d], slots[g, r + 1])
    assert torch.equal(got["model.layers.0.mlp.gate_proj.weight"][:, 0], torch.arange(128.0))
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"][:, 0], torch.arange(128.0, 256.0))
    back = hf_llama.from_hf(got, cfg)
    assert torch.equal(back["decoder.layers.0.self_attention.linear_qkv.weight"], qkv)
    assert torch.equal(back["decoder.layers.0.mlp.linear_fc1.weight"], fc1)


# Transformer Engine's names (model.spec=te) for the local names, written out independently of
# megafusion.interop.names: TELayerNormColumnParallelLinear holds the layer's norms, TENorm has
# no inner .norm, TEGroupedMLP numbers its experts' weights.
def te_name(local: str) -> str:
    for old, new in ((".input_layernorm.norm.", ".self_attention.linear_qkv.layer_norm_"),
                     (".pre_mlp_layernorm.norm.", ".mlp.linear_fc1.layer_norm_"),
                     ("decoder.final_layernorm.norm.", "decoder.final_layernorm.")):
        if old in local:
            return local.replace(old, new)
    if ".experts.local_experts." in local:
        head, tail = local.split(".experts.local_experts.")
        index, fc, param = tail.split(".")
        return f"{head}.experts.{fc}.{param}{index}"
    return local


def test_te_spec_names_export_to_the_local_names():
    from megafusion.interop import names

    local = {"embedding.word_embeddings.weight": torch.randn(8, 4),
             "decoder.final_layernorm.norm.weight": torch.randn(4)}
    for i in range(2):
        for suffix in ("input_layernorm.norm.weight", "pre_mlp_layernorm.norm.weight",
                       "self_attention.linear_qkv.weight", "self_attention.linear_proj.weight",
                       "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"):
            local[f"decoder.layers.{i}.{suffix}"] = torch.randn(3)
    moe = {f"decoder.layers.2.mlp.experts.local_experts.{e}.linear_fc{i}.weight": torch.randn(2)
           for e in range(4) for i in (1, 2)}
    te = {te_name(k): v for k, v in {**local, **moe}.items()}
    te["decoder.layers.2.pre_mlp_layernorm.weight"] = norm = torch.randn(2)  # a TENorm before the MoE layer
    te["decoder.layers.0.self_attention.core_attention._extra_state"] = torch.zeros(1)
    assert "decoder.layers.0.self_attention.linear_qkv.layer_norm_weight" in te
    assert "decoder.layers.2.mlp.experts.linear_fc1.weight3" in te
    exported = names.export_state(te)
    want = {**local, **moe, "decoder.layers.2.pre_mlp_layernorm.norm.weight": norm}
    assert sorted(exported) == sorted(want)
    assert all(exported[k] is v for k, v in want.items())


@pytest.mark.distributed
def test_te_named_model_loads_an_export_and_exports_the_same_names(base):
    """A module tree with TE's names (the PP2 run's state, renamed) takes the export's tensors
    by load_strict and exports them under the same names and values."""
    from megafusion.interop import names
    from megafusion.interop.safetensors_io import load_strict, read_tensors

    _, out = trained("pp2", base)
    tensors = read_tensors(out)  # Hugging Face names mapped back to megafusion's
    te_model = torch.nn.Module()
    for name, t in tensors.items():
        *path, leaf = te_name(name).split(".")
        module = te_model
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, torch.nn.Parameter(torch.zeros_like(t)))
    assert any(k.endswith("linear_qkv.layer_norm_weight") for k in te_model.state_dict())
    load_strict(te_model, tensors, out, "fp32")
    exported = names.export_state(te_model.state_dict())
    assert sorted(exported) == sorted(tensors)
    assert all(torch.equal(exported[k], tensors[k]) for k in tensors)


@pytest.mark.distributed
def test_the_first_config_json_layout_still_loads(base, tmp_path, cpu_layer):
    """Exports written before issue 27 (megafusion's fields at the top of config.json, header
    format 'megafusion-safetensors-v1') load and import as before."""
    from safetensors.torch import save_file

    from megafusion.interop.export import export_run
    from megafusion.interop.import_ import import_export

    run_dir, _ = trained("tp2", base)
    new = export_run(run_dir, tmp_path / "new")
    old = tmp_path / "old"
    old.mkdir()
    save_file(load_file(str(new / "model.safetensors")), str(old / "model.safetensors"),
              metadata={"format": "megafusion-safetensors-v1"})
    (old / "config.json").write_text(json.dumps(json.loads((new / "config.json").read_text())["megafusion"]))
    want = megafusion_logits(run_dir, TOKENS)
    torch.testing.assert_close(megafusion_logits(old, TOKENS), want, rtol=0, atol=1e-6)
    import_export(old, tmp_path / "imported")
    torch.testing.assert_close(megafusion_logits(tmp_path / "imported", TOKENS), want, rtol=0, atol=1e-6)


@pytest.mark.distributed
def test_top_level_fields_must_agree_with_the_config(base, tmp_path):
    from megafusion.config import ConfigError
    from megafusion.interop.export import export_run
    from megafusion.interop.safetensors_io import read_config

    run_dir, out = trained("tp2", base)
    new = export_run(run_dir, tmp_path / "new")
    raw = json.loads((new / "config.json").read_text())
    for key, value, message in (("model_type", "megafusion-transfusion", "model_type = 'megafusion-transfusion'"),
                                ("notes", "hi", r"unknown field\(s\) \['notes'\]")):
        (tmp_path / "new" / "config.json").write_text(json.dumps({**raw, key: value}))
        with pytest.raises(ConfigError, match=message):
            read_config(new)
    hf = json.loads((out / "config.json").read_text())
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**hf, "num_key_value_heads": 4}))
    with pytest.raises(ConfigError, match="'num_key_value_heads' is 4 but the megafusion config gives 2"):
        read_config(tmp_path / "hf")


def test_plain_llama_configs_megafusion_cannot_run_are_refused(tmp_path):
    from megafusion.interop import hf_llama

    cfg = hf_llama.hf_config(text_cfg(num_kv_heads=2), "fp32")
    assert hf_llama.config_tree(cfg, "x")["model"]["num_kv_heads"] == 2
    for change, reason in (({"hidden_act": "gelu"}, "hidden_act = 'gelu'"), ({"attention_bias": True}, "attention_bias"),
                           ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope scaling"),
                           ({"rms_norm_eps": 1e-6}, "rms_norm_eps = 1e-06")):
        with pytest.raises(ValueError, match=reason):
            hf_llama.config_tree({**cfg, **change}, "x")


def test_write_tensors_shows_progress_only_when_asked_or_big(tmp_path, capsys, monkeypatch):
    from megafusion.interop import safetensors_io

    tensors = {f"t{i}": torch.randn(100, 100) for i in range(4)}
    safetensors_io.write_tensors(tensors, tmp_path, "50KB")  # stderr is not a terminal here, and it is small
    assert capsys.readouterr().err == ""
    assert json.loads((tmp_path / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == 160_000
    safetensors_io.write_tensors(tensors, tmp_path, "50KB", progress=True)
    assert "writing" in capsys.readouterr().err
    monkeypatch.setattr(safetensors_io, "PROGRESS_BYTES", 1000)  # a "big" export shows it by default
    safetensors_io.write_tensors(tensors, tmp_path, "5GB")
    assert "writing" in capsys.readouterr().err
    assert load_file(str(tmp_path / "model.safetensors")).keys() == tensors.keys()
    assert not (tmp_path / "model.safetensors.index.json").exists()  # the sharded files went first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
