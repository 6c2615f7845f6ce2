"""`megafusion bench`: one real run of the tiny MoE Transfusion config on CPU, checked for
its fields and internal consistency, plus the profile attribution on a known toy graph."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import CONFIGS, REPO
from megafusion.bench import main, range_times

STEPS, WARMUP, PROFILE_STEPS = 2, 1, 1


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "nested" / "results.json"
    cmd = [sys.executable, "-m", "megafusion.bench", str(CONFIGS / "tiny_transfusion_moe.yaml"),
           "--set", "train.global_batch_size=4", "--steps", str(STEPS), "--warmup", str(WARMUP),
           "--profile-steps", str(PROFILE_STEPS), "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "tokens/s" in proc.stdout and "attention" in proc.stdout  # the printed table
    return json.loads(out.read_text())


def test_json_has_every_field(result):
    for key in ("config", "command", "device", "versions", "tokens_per_s", "tflops_per_gpu", "mfu",
                "peak_memory_bytes", "peak_memory_kind", "time_split", "step_time_s", "tokens_per_step",
                "world_size", "ranges_seen"):
        assert key in result, key
    assert result["versions"]["torch"] == torch.__version__
    assert result["command"].startswith("megafusion bench ") and "--steps 2" in result["command"]
    assert result["config"]["train"]["steps"] == WARMUP + STEPS + 1 + PROFILE_STEPS
    assert result["config"]["checkpoint"]["save_final"] is False
    assert result["peak_memory_kind"] == "cpu_peak_rss" and result["peak_memory_bytes"] > 100 * 2**20


def test_tokens_per_s_matches_tokens_per_step_and_step_time(result):
    cfg = result["config"]
    assert result["tokens_per_step"] == cfg["train"]["global_batch_size"] * cfg["model"]["seq_length"]
    assert len(result["step_times_s"]) == STEPS
    mean_step = sum(result["step_times_s"]) / STEPS
    assert math.isclose(result["step_time_s"], mean_step, rel_tol=1e-9)
    assert math.isclose(result["tokens_per_s"], result["tokens_per_step"] / mean_step, rel_tol=1e-9)
    assert result["tflops_per_gpu"] > 0


def test_mfu_is_null_on_cpu(result):
    assert result["device_type"] == "cpu"
    assert result["mfu"] is None and result["mfu_vs_precision_peak"] is None


def test_time_split_fractions(result):
    split = result["time_split"]
    assert set(split) == {"attention", "moe_dispatch", "data", "other"}
    assert all(0.0 <= v <= 1.0 for v in split.values()), split
    assert sum(split.values()) <= 1.0 + 1e-6
    # the Transfusion model's hybrid attention and the MoE token dispatch both take time
    assert split["attention"] > 0 and split["moe_dispatch"] > 0 and split["data"] > 0
    assert {"megafusion.attention", "megafusion.moe_dispatch", "megafusion.data"} <= set(result["ranges_seen"])


def test_bad_config_exits_2_before_training(capsys):
    rc = main([str(CONFIGS / "tiny_transfusion.yaml"), "--set", "train.fp8=delayed", "--steps", "1"])
    assert rc == 2
    assert "train.fp8 = delayed needs model.spec = te" in capsys.readouterr().err


def test_range_times_counts_forward_range_and_its_backward():
    """Attention = its forward range + the backward of the ops inside it, nothing else."""
    from torch.profiler import ProfilerActivity, profile, record_function

    q = torch.randn(1, 2, 128, 16, requires_grad=True)
    lin = torch.nn.Linear(16, 16)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        x = lin(q)  # outside the range: neither it nor its backward is attention
        with record_function("megafusion.attention"):
            o = F.scaled_dot_product_attention(x, x, x, is_causal=True)
        with record_function("megafusion.data"):
            torch.randn(256, 256).sum()
        o.sum().backward()
    events = prof.events()
    times = range_times(events, device=False)
    forward = sum(e.cpu_time_total for e in events if e.name == "megafusion.attention")
    backward = [e for e in events if e.name.startswith("autograd::engine::evaluate_function:")
                and "ScaledDotProduct" in e.name]
    assert len(backward) == 1
    assert times["megafusion.attention"] == pytest.approx((forward + backward[0].cpu_time_total) / 1e6, rel=1e-9)
    data = sum(e.cpu_time_total for e in events if e.name == "megafusion.data")
    assert times["megafusion.data"] == pytest.approx(data / 1e6, rel=1e-9)
    assert times["megafusion.moe_dispatch"] == 0.0


def test_summarize_prints_a_markdown_row(result):
    from megafusion.bench import markdown_table

    table = markdown_table({"tiny_moe": result}).splitlines()
    assert len(table) == 3 and table[0].count("|") == table[1].count("|") == table[2].count("|")
    assert table[2].startswith("| tiny_moe | cpu") and f"{result['tokens_per_s']:,.0f}" in table[2]


# --------------------------------------------------------------------------- the GPU matrix


H100_MEMORY = (80 * 10**9, "GPU 0 (NVIDIA H100 80GB HBM3) has", "cuda")


@pytest.fixture
def on_h100(monkeypatch):
    """validate's memory guard as on the bench configs' target, an 80 GB H100 (both need
    more than a CPU test machine's RAM: a 1B model's weights, gradients and Adam states
    alone are ~17 GiB)."""
    from megafusion.training import memory

    monkeypatch.setattr(memory, "device_memory", lambda cfg: H100_MEMORY)


def _provider(name):
    from megafusion.config import load_config, validate
    from megafusion.recipes.transfusion import TransfusionProvider

    cfg = load_config(CONFIGS / name)
    validate(cfg, world_size=1)
    return TransfusionProvider(cfg, transformer_config=None)


def test_bench_configs_load_validate_and_have_the_intended_sizes(on_h100):
    from megafusion.scaling.flops import params

    dense = params(_provider("bench_transfusion_1b.yaml").model_shape)
    moe = params(_provider("bench_transfusion_moe.yaml").model_shape)
    assert 0.8e9 <= dense.total <= 1.3e9, dense
    assert 0.75 <= moe.active / dense.active <= 1.25, (moe, dense)  # comparable active size
    assert moe.total > 1.5 * moe.active


def test_gpu_script_rows_are_valid_configs(monkeypatch, on_h100):
    """Every row of benchmarks/run_train_bench_gpu.sh validates on an H100 with TE (mocked),
    writes its own JSON, and the rows cover the matrix of the issue."""
    import shlex

    from megafusion import config as config_module
    from megafusion.config import load_config, validate

    monkeypatch.setattr(config_module, "_cuda_capability", lambda cfg: ("NVIDIA H100 80GB HBM3", (9, 0)))
    monkeypatch.setattr(config_module, "_transformer_engine_installed", lambda: True)
    script = (REPO / "benchmarks" / "run_train_bench_gpu.sh").read_text()
    configs = {"$DENSE": "bench_transfusion_1b.yaml", "$MOE": "bench_transfusion_moe.yaml"}
    rows = {}
    for line in script.splitlines():
        if not line.startswith("row "):
            continue
        _, name, needs_te, config, *rest = shlex.split(line)
        overrides = [rest[i + 1] for i in range(0, len(rest), 2) if rest[i] == "--set"]
        assert len(overrides) * 2 == len(rest), line
        cfg = load_config(CONFIGS / configs[config], overrides)
        validate(cfg, world_size=1)
        assert (needs_te == "te") == (cfg.model.spec == "te"), line
        assert name not in rows, f"two rows write {name}.json"
        rows[name] = cfg
    seen = {(c.model.attention, c.model.moe.dispatch if c.model.moe.num_experts else None, c.train.fp8)
            for c in rows.values()}
    assert {a for a, _, _ in seen} == {"sdpa", "flex", "triton"}
    assert {d for _, d, _ in seen} >= {"megatron", "triton", None}
    assert {f for _, _, f in seen} >= {"none", "delayed", "tensorwise"}
    assert any(c.model.moe.num_experts and c.train.fp8 != "none" for c in rows.values())


@pytest.mark.distributed
def test_torchrun_two_processes_rank0_writes(tmp_path):
    out = tmp_path / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "megafusion.bench", str(CONFIGS / "tiny_transfusion.yaml"), "--set", "train.global_batch_size=4",
           "--steps", "1", "--warmup", "0", "--profile-steps", "1", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert proc.stdout.count("megafusion bench: wrote") == 1  # rank 0 only
    result = json.loads(out.read_text())
    assert result["world_size"] == 2 and result["launcher"] == "torchrun, 2 processes"
    assert result["tokens_per_s_per_gpu"] == pytest.approx(result["tokens_per_s"] / 2)
    assert result["time_split"]["attention"] > 0


def _records(step_times, tflops):
    return [{"step": i + 1, "step_time_s": t, "tflops_per_gpu": f, "data_time_s": 0.01, "loss": 1.0}
            for i, (t, f) in enumerate(zip(step_times, tflops))]


def test_summary_mfu_uses_this_gpus_peak_or_none():
    """GPU arithmetic on made-up metrics: FLOP-weighted TFLOP/s, MFU of an FP8 run from the
    H100 SXM's dense fp8 peak (1978.9; bf16: 989.4), null for a GPU the table does not know."""
    from megafusion.bench import summarize
    from megafusion.config import load_config

    cfg = load_config(CONFIGS / "bench_transfusion_1b.yaml", ["model.spec=te", "train.fp8=delayed"])
    # warmup step 1, timed steps 2-3, profiler warmup step 4, profiled step 5
    records = _records([9.0, 1.0, 3.0, 7.0, 2.0], [1.0, 400.0, 500.0, 1.0, 300.0])
    times = {"megafusion.attention": 0.5, "megafusion.moe_dispatch": 0.0, "megafusion.data": 0.1}
    h100 = summarize(records, cfg, "cuda", "NVIDIA H100 80GB HBM3", (2**30, "cuda_max_memory_allocated"),
                     warmup=1, steps=2, profile_steps=1, split_times=times, seen=list(times), world_size=8)
    tflops = (400.0 * 1.0 + 500.0 * 3.0) / 4.0
    assert h100["tflops_per_gpu"] == pytest.approx(tflops)
    assert h100["mfu_peak_dtype"] == "fp8" and h100["mfu"] == pytest.approx(tflops / 1978.9)
    assert h100["mfu_vs_precision_peak"] == pytest.approx(tflops / 989.4)
    assert h100["tokens_per_s"] == pytest.approx(8 * 4096 * 2 / 4.0)
    assert h100["tokens_per_s_per_gpu"] == pytest.approx(h100["tokens_per_s"] / 8)
    assert h100["time_split"] == pytest.approx({"attention": 0.25, "moe_dispatch": 0.0, "data": 0.05, "other": 0.7})
    unknown = summarize(records, cfg, "cuda", "NVIDIA RTX 6000 Ada Generation", (0, "cuda_max_memory_allocated"),
                        1, 2, 1, times, list(times))
    assert unknown["mfu"] is None and unknown["mfu_vs_precision_peak"] is None
    # a MoE model whose profile lacks the dispatch range: not measured, not zero
    moe_cfg = load_config(CONFIGS / "bench_transfusion_moe.yaml")
    moe = summarize(records, moe_cfg, "cpu", "cpu", (0, "cpu_peak_rss"), 1, 2, 1, times,
                    ["megafusion.attention", "megafusion.data"])
    assert moe["time_split"]["moe_dispatch"] is None and moe["mfu"] is None


def test_non_finite_gradients_exit_3_with_one_line(tmp_path):
    """lr=1e30 blows the weights up: bench stops like `megafusion train` (exit 3), no traceback."""
    cmd = [sys.executable, "-m", "megafusion.bench", str(CONFIGS / "tiny_text.yaml"), "--set", "optimizer.lr=1e30",
           "--set", "optimizer.clip_grad=0", "--steps", "6", "--warmup", "0", "--profile-steps", "0",
           "--out", str(tmp_path / "r.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 3, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "non-finite" in proc.stderr.lower() and not (tmp_path / "r.json").exists()
