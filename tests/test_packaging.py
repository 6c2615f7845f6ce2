"""Installing and running from anywhere (issue 27).

The Triton kernels live in ``kernels/megafusion_kernels/`` and import as ``megafusion_kernels``;
``kernels/`` itself has no ``__init__.py``, so the name ``kernels`` belongs to Hugging Face's
package (``transformers`` >= 5.25 requires it), also from the repository root, where ``python -c``
puts the working directory first on ``sys.path``. Python treats a folder without
``__init__.py`` at most as a portion of a namespace package, and a regular package anywhere
later on ``sys.path`` beats it; with Hugging Face's package absent, ``import kernels`` from the
root gives an empty namespace package, never our code.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "kernels" / "megafusion_kernels"

RESOLVE = """
import json
try:
    import kernels
except ModuleNotFoundError:
    print(json.dumps(None))
else:
    print(json.dumps({"file": getattr(kernels, "__file__", None),
                      "path": list(getattr(kernels, "__path__", []))}))
"""


def resolve_kernels(cwd: Path, code: str = RESOLVE) -> dict | None:
    """What ``import kernels`` gives to ``python -c`` started in ``cwd`` (sys.path[0] == '')."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def hf_kernels_installed() -> bool:
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def under(path: str | None, folder: Path) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(folder.resolve())


def test_kernels_folder_is_not_a_package():
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/ must not be a regular package"
    assert (KERNELS / "__init__.py").is_file()


def test_import_kernels_from_the_repository_root(tmp_path):
    """From the root, ``kernels`` is Hugging Face's package when it is installed (the same module as
    from anywhere else); without it, nothing of ours: no module, or an empty namespace package."""
    from_root = resolve_kernels(REPO)
    if hf_kernels_installed():
        elsewhere = resolve_kernels(tmp_path)
        assert from_root is not None and from_root["file"] is not None, from_root
        assert not under(from_root["file"], REPO), f"`import kernels` from the root found ours: {from_root}"
        assert from_root == elsewhere
    else:
        assert from_root is None or (from_root["file"] is None and all(
            not any(Path(p, "__init__.py").exists() or list(Path(p).glob("*.py")) for p in from_root["path"]))), \
            from_root


def test_transformers_requirement_on_kernels_is_met():
    """CI installs the newest transformers (ci/install.sh --dev); since 5.25 it requires Hugging Face's
    ``kernels``: when the installed transformers declares it, it must be installed, and then the test
    above checked that it wins from the root."""
    try:
        requires = importlib.metadata.requires("transformers") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("transformers is not installed (it comes with ci/install.sh --dev)")
    needs_kernels = any(r.split(";")[0].strip().startswith("kernels") and "extra ==" not in r for r in requires)
    if needs_kernels:
        assert hf_kernels_installed(), "transformers requires `kernels`, which is not installed"


def test_regular_package_beats_the_kernels_folder(tmp_path):
    """Independent of what is installed: a regular ``kernels`` package later on sys.path (where
    site-packages is) wins over the repository's ``kernels/`` folder found first."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'hf'\n")
    code = f"import sys; sys.path.insert(1, {str(tmp_path / 'site')!r})\n" + RESOLVE
    found = resolve_kernels(REPO, code)
    assert found is not None and under(found["file"], fake), found
    # ... and with no other `kernels` anywhere, the folder is at most an empty namespace package.
    code = "import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p and 'dist-packages' not in p]\n"
    found = resolve_kernels(REPO, code + RESOLVE)
    assert found is None or found["file"] is None, found


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_megafusion_kernels_import_from_anywhere(where, tmp_path):
    cwd = REPO if where == "root" else tmp_path
    code = "import json, megafusion_kernels, megafusion.ops; print(json.dumps(megafusion_kernels.__file__))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert under(json.loads(proc.stdout.strip().splitlines()[-1]), KERNELS)


def test_transformers_loads_a_model_from_the_repository_root(tmp_path):
    """What the old top-level ``kernels`` package broke: transformers >= 5.25 imports Hugging Face's
    ``kernels`` while loading a model; from the root it must get theirs and load."""
    pytest.importorskip("transformers")
    code = f"""
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
torch.manual_seed(0)
LlamaForCausalLM(cfg).save_pretrained({str(tmp_path / 'tiny')!r})
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'tiny')!r})
print(tuple(model(torch.tensor([[1, 2, 3]])).logits.shape))
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
                               "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "(1, 3, 32)"


def test_kernels_import_nothing_of_megafusion_or_megatron():
    """design.md: the kernels are pure functions on tensors."""
    for path in sorted(KERNELS.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            for name in names:
                top = name.split(".")[0]
                assert top not in ("megafusion", "megatron", "kernels"), f"{path.relative_to(REPO)} imports {name}"


def test_pyproject_lists_every_package():
    """setuptools gets an explicit package list: every folder with an __init__.py under
    megafusion/ and kernels/megafusion_kernels/ is in it, and every listed one exists."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    dirs = tool.get("package-dir", {})

    def folder(pkg: str) -> Path:
        top, _, rest = pkg.partition(".")
        base = REPO / dirs.get(top, top)
        return base.joinpath(*rest.split(".")) if rest else base

    listed = set(tool["packages"])
    for pkg in listed:
        assert (folder(pkg) / "__init__.py").is_file(), f"{pkg} -> {folder(pkg)} is no package"
    for top in ("megafusion", "megafusion_kernels"):
        for init in folder(top).rglob("__init__.py"):
            rel = init.parent.relative_to(folder(top)).parts
            assert ".".join((top, *rel)) in listed, f"{init.parent} is missing from pyproject's packages"


def test_extras_and_floors():
    """lpips in an extra; DALI per CUDA major; torch floor = megatron-core's (when its metadata is here)."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert "lpips" in extras["lpips"]
    assert "nvidia-dali-cuda120" in extras["gpu-cu12"] and "nvidia-dali-cuda130" in extras["gpu-cu13"]
    torch_req = next(r for r in project["dependencies"] if r.startswith("torch"))
    try:
        mcore = importlib.metadata.requires("megatron-core") or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("megatron-core is not installed")
    mcore_torch = next(r for r in mcore if r.replace(" ", "").startswith("torch") and "extra" not in r)
    assert torch_req.replace(" ", "") == mcore_torch.replace(" ", ""), (torch_req, mcore_torch)
