"""`megafusion config show` and docs/config.md: both read each key's meaning from config.py's comments."""

import subprocess
import sys

import pytest
import yaml

from conftest import CONFIGS, REPO
from megafusion.config import Config, load_config
from megafusion.config_cli import main
from megafusion.config_doc import DOCS_PATH, REGENERATE, field_comments, keys, render_markdown


def test_docs_config_md_is_current():
    committed = (REPO / DOCS_PATH).read_text() if (REPO / DOCS_PATH).is_file() else ""
    assert committed == render_markdown(), f"{DOCS_PATH} is stale: regenerate it with `{REGENERATE}`"


def test_every_key_has_a_description_type_and_default():
    rows = keys()
    assert [row.key for row in rows] == [row.key for row in keys(Config())]
    assert len(rows) > 90
    undocumented = [row.key for row in rows if not row.comment]
    assert not undocumented, f"add a `# ...` comment to these fields in megafusion/config.py: {undocumented}"
    doc = render_markdown()
    for row in rows:
        assert f"| `{row.key}` |" in doc


def test_comments_above_and_after_a_field_are_both_read():
    from megafusion.config import DataConfig, ModelConfig
    from megafusion.diffusion.flow import FlowMatchingConfig

    data = field_comments(DataConfig)
    assert data["num_workers"].startswith("Background loading") and "0 on CPU" in data["num_workers"]
    assert data["prefetch"] == "steps each loading worker keeps ready"
    assert field_comments(ModelConfig)["kind"] == "which provider builds the model"
    assert "----" not in field_comments(ModelConfig)["ffn"]  # a divider is no description
    # a section without comments documents its fields in its docstring
    flow = field_comments(FlowMatchingConfig)
    assert flow["logit_normal_mean"] == flow["logit_normal_std"] and "sigmoid" in flow["logit_normal_std"]


def test_choices_and_transfusion_only_keys_are_marked():
    doc = render_markdown()
    assert "| `train.precision` | `fp32` \\| `bf16` \\| `fp16` | `fp32` |" in doc
    assert "*Transfusion only.*" in doc.split("| `model.attention` |")[1].split("\n")[0]


def test_show_prints_yaml_that_loads_back(tmp_path, capsys):
    overrides = ["train.steps=5", "model.image_positions=2d", "data.shapes_weights={text: 1, image_text: 2}"]
    assert main(["show", "--config", str(CONFIGS / "tiny_transfusion.yaml")] + sum(
        (["--set", item] for item in overrides), [])) == 0
    out = capsys.readouterr().out
    (tmp_path / "shown.yaml").write_text(out)
    assert load_config(tmp_path / "shown.yaml") == load_config(CONFIGS / "tiny_transfusion.yaml", overrides)
    assert isinstance(yaml.safe_load(out)["model"]["moe"], dict)
    assert "  # which provider builds the model\n  kind: transfusion  # text | transfusion; default: text\n" in out
    assert "  steps: 5  # default: 100\n" in out
    assert "  image_positions: 2d  # 1d | 2d | 3d; Transfusion only; default: 1d\n" in out


@pytest.mark.parametrize("args, message", [
    (["--set", "train.precision=fp8"], "train.precision = 'fp8' is not one of fp32, bf16, fp16"),
    (["--set", "model.hiden_size=8"], "Did you mean 'model.hidden_size'?"),
    (["--config", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["--set", "parallel.tp=3", "--check", "--world-size", "3"],
     "invalid config: model.num_heads = 4 is not divisible by parallel.tp = 3; model.num_kv_heads"),
])
def test_show_refuses_a_bad_config_with_one_line(capsys, args, message):
    assert main(["show"] + args) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("megafusion config show: ") and message in captured.err
    assert captured.err.count("\n") == 1


def test_megafusion_config_command():
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", "config", "show", "--set", "parallel.tp=2"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "  tp: 2  # default: 1\n" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", "config", "docs"],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0 and proc.stdout == render_markdown()
