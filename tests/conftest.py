"""Shared fixtures. Environment first: Triton's interpreter must be chosen before any
``@triton.jit`` decorator runs, and one thread keeps tiny CPU jobs from swinging 50x."""

import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(1)

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")

# `pytest -m gpu` (benchmarks/gpu_check.sh) selects every test that needs the GPU machine:
# those marked gpu, and those skipped with a reason that names a GPU, CUDA or Transformer
# Engine (requires_gpu above and its like), whether or not they skip here.
_GPU_REASON = re.compile(r"\bGPU\b|CUDA|Transformer Engine")


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(_GPU_REASON.search(str(mark.kwargs.get("reason", ""))) for mark in item.iter_markers("skipif")):
            item.add_marker(pytest.mark.gpu)


@pytest.fixture
def seed():
    torch.manual_seed(0)
    return 0


# --------------------------------------------------------------------------- running the trainer

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "examples" / "configs"


def run_train(run_dir: Path, config: str, overrides: list[str] = (), nproc: int = 1,
              expect_rc: int = 0, timeout: int = 600) -> subprocess.CompletedProcess:
    """Runs the real ``megafusion train`` entry point (under torchrun when nproc > 1)."""
    config_path = CONFIGS / config if not Path(config).is_absolute() else Path(config)
    args = ["--config", str(config_path), "--run-dir", str(run_dir)]
    for item in overrides:
        args += ["--set", item]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "-m", "megafusion.train", *args]
    else:
        cmd = [sys.executable, "-m", "megafusion.train", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != expect_rc:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} (expected {expect_rc})\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-8000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses_by_step(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(run_dir) if key in m}


@pytest.fixture(scope="module", autouse=True)
def cpu_layer_not_leaked(request):
    """No test module may leave megafusion's CPU compatibility layer active: whatever applies
    it (``cpu_layer``, an entry point, ``cpu_compat.applied``) removes it again. A module that
    leaks it fails here, by name (and the layer is removed so the next module starts clean)."""
    from megafusion.parallel import cpu_compat

    was_active = cpu_compat.is_active()
    yield
    if cpu_compat.is_active() and not was_active:
        cpu_compat.remove()
        pytest.fail(f"{request.module.__name__} left megafusion's CPU compatibility layer active: a test or "
                    "fixture applied it without removing it (use the cpu_layer fixture or "
                    "`with cpu_compat.applied(...)`)", pytrace=False)


@pytest.fixture(scope="module")
def cpu_layer():
    """megafusion's CPU compatibility layer, for tests that build megatron models in this process
    (``init_parallel``, ``load_run``, ``build_model``, ``build_model_chunks``) as the entry points
    do; removed afterwards unless it was already active."""
    from megafusion.parallel import cpu_compat

    with cpu_compat.applied("cpu"):
        yield cpu_compat


@pytest.fixture(scope="module")
def megatron_world(cpu_layer):
    """A gloo world of one with megatron's model-parallel groups (left as found afterwards)."""
    import tempfile

    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    owns_dist = not dist.is_initialized()
    if owns_dist:
        store = tempfile.NamedTemporaryFile(prefix="megatron-world-", delete=False).name
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    owns_mp = not parallel_state.model_parallel_is_initialized()
    if owns_mp:
        parallel_state.initialize_model_parallel(1, 1, expert_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    yield
    if owns_mp:
        parallel_state.destroy_model_parallel()
    if owns_dist:
        dist.destroy_process_group()
