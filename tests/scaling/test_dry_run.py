"""``megafusion train --dry-run``: the shipped configs at their world sizes, 4096 ranks,
--rank, JSON, and bad input (one line, exit 2). Exactness against real models:
tests/scaling/test_dry_run_exact.py."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megafusion.config import load_config, validate
from megafusion.parallel import cpu_compat
from megafusion.scaling.dry_run import GIB, dry_run, format_table
from megafusion.train import main as train_main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "examples" / "configs"
SHIPPED = {"transfusion_1b_8gpu.yaml": 8, "transfusion_7b_64gpu.yaml": 64, "transfusion_moe_30b_a3b_256gpu.yaml": 256}


def _dry(name: str, world_size: int, overrides=(), rank=None):
    cfg = load_config(CONFIGS / name, list(overrides))
    validate(cfg, world_size, check_memory=False)
    with cpu_compat.applied("cpu"):
        return cfg, dry_run(cfg, world_size, rank, config_name=name)


@pytest.mark.parametrize("name", list(SHIPPED))
def test_shipped_configs_dry_run_and_fit_80gb(name):
    world_size = SHIPPED[name]
    cfg, run = _dry(name, world_size)
    p, m = cfg.parallel, cfg.model
    assert [r.pp_rank for r in run.ranks] == list(range(p.pp))  # one rank per pipeline stage
    assert all((r.tp_rank, r.dp_rank, r.ep_rank) == (0, 0, 0) for r in run.ranks)
    assert run.layout["dp"] == world_size // (p.tp * p.pp)
    for r in run.ranks:
        assert r.param_bytes == 2 * r.params  # bf16 weights
        assert r.grad_buffer_numel >= r.params and r.grad_buffer_bytes == 4 * r.grad_buffer_numel  # fp32 grads
        assert r.optimizer_bytes == 12 * r.params  # fp32 main weights + two moments, replicated
        assert r.optimizer_bytes_distributed < r.optimizer_bytes  # sharded over DP
        assert r.total_bytes < 80 * GIB, format_table(run)  # what the config promises
    # Vocabulary rows are split over TP: the input embedding on the first stage, the (untied)
    # LM head on the last one (with pp 1 both on the same rank, tied: counted once).
    vocab_shard = m.vocab_size * m.hidden_size // p.tp
    expect = [vocab_shard] if p.pp == 1 else [vocab_shard] + [0] * (p.pp - 2) + [vocab_shard]
    if p.pp == 1 and not m.tie_embeddings:
        expect = [2 * vocab_shard]
    assert [r.embedding_params for r in run.ranks] == expect
    # Routed experts: every expert of every layer lives on exactly one (pp, ep) coordinate.
    moe = m.moe
    if moe.num_experts:
        per_expert = 3 * m.hidden_size * moe.ffn_hidden_size  # SwiGLU: gate, up, down
        assert sum(r.expert_params for r in run.ranks) * p.ep == m.num_layers * moe.num_experts * per_expert
    else:
        assert all(r.expert_params == 0 for r in run.ranks)


def test_stages_add_up_to_the_flops_count():
    """Without TP (whose ranks also replicate norms and the plain-torch adapters) the stages'
    parameters add up to megafusion.scaling.flops' count of the whole model, exactly."""
    from megafusion.scaling.flops import ModelShape, params

    cfg, run = _dry("transfusion_7b_64gpu.yaml", 16, ["parallel.tp=1", "parallel.sp=false"])
    shape = ModelShape.from_model_config({**cfg.to_dict()["model"], "latent_dim": 48})  # 4x4x3 pixel patches
    assert len(run.ranks) == 2
    assert sum(r.params for r in run.ranks) == params(shape).total


def test_world_size_4096_through_the_cli_with_json(tmp_path):
    out = tmp_path / "plan" / "moe.json"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "megafusion.train", "--dry-run", "--world-size", "4096",
         "--config", str(CONFIGS / "transfusion_moe_30b_a3b_256gpu.yaml"), "--set", "train.global_batch_size=4096",
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert elapsed < 60, elapsed
    report = json.loads(out.read_text())
    assert report["world_size"] == 4096
    assert report["layout"]["dp"] == 2048 and report["layout"]["expert_dp"] == 256
    assert [r["rank"] for r in report["ranks"]] == [0, 2048]
    # The table printed the same ranks, in GiB against 80.
    lines = proc.stdout.splitlines()
    assert "world size 4096" in lines[0] and "of 80" in lines[2]
    assert [line.split()[0] for line in lines[4:6]] == ["0", "2048"]
    # At 16x the DP size the distributed optimizer's shard is far smaller than at 256 GPUs.
    _, at_256 = _dry("transfusion_moe_30b_a3b_256gpu.yaml", 256)
    assert report["ranks"][0]["optimizer_bytes_distributed"] < at_256.ranks[0].optimizer_bytes_distributed / 8
    assert report["ranks"][0]["params"] == at_256.ranks[0].params


def test_rank_selects_one_rank(tmp_path, capsys):
    out = tmp_path / "r37.json"
    rc = train_main(["--dry-run", "--world-size", "64", "--rank", "37", "--gpu-memory-gb", "141",
                     "--config", str(CONFIGS / "transfusion_7b_64gpu.yaml"), "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["gpu_memory_gb"] == 141
    (rank,) = report["ranks"]
    # megatron's order tp-cp-ep-dp-pp: 37 = tp 1 + 4 * (dp 1) + 32 * (pp 1)
    assert (rank["rank"], rank["tp_rank"], rank["dp_rank"], rank["pp_rank"]) == (37, 1, 1, 1)
    _, stages = _dry("transfusion_7b_64gpu.yaml", 64)
    assert rank["params"] == stages.ranks[1].params  # TP ranks of a stage hold equal shards
    assert "of 141" in capsys.readouterr().out


def test_step_time_is_reported_and_follows_the_assumptions(tmp_path, capsys):
    """The dry run ends with the step-time estimate; the MFU and bandwidth flags are used."""
    def step(*flags):
        out = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
        assert train_main(["--dry-run", "--world-size", "64", "--config", str(CONFIGS / "transfusion_7b_64gpu.yaml"),
                           "--json", str(out), *flags]) == 0
        return json.loads(out.read_text())["step_time"]

    base = step()
    assert "estimated step time" in capsys.readouterr().out
    assert base["total_s"] == pytest.approx(sum(base[k] for k in ("compute_s", "bubble_s", "tp_comm_s", "ep_comm_s",
                                                                    "pp_comm_s", "dp_comm_s")))
    assert step("--mfu", "0.2")["compute_s"] == pytest.approx(2 * base["compute_s"])
    # TP 4 stays inside an 8-GPU node: only the NVLink figure moves it
    assert step("--nvlink-gb-s", "900")["tp_comm_s"] == pytest.approx(base["tp_comm_s"] / 2)
    assert step("--ib-gb-s", "100")["dp_comm_s"] == pytest.approx(base["dp_comm_s"] / 2)


def test_vpp_reports_each_chunk():
    cfg, run = _dry("transfusion_7b_64gpu.yaml", 64, ["parallel.vpp=2"])
    for r in run.ranks:
        assert [c.vp_stage for c in r.chunks] == [0, 1]
        assert r.params == sum(c.params for c in r.chunks)
        assert r.grad_buffer_numel == sum(c.grad_buffer_numel for c in r.chunks)
    # Interleaving: stage 0 holds the first and the third quarter of the layers, the
    # embedding on chunk 0 only; the last stage holds the LM head on its last chunk.
    assert run.ranks[0].chunks[0].embedding_params > 0 == run.ranks[0].chunks[1].embedding_params
    assert run.ranks[1].chunks[1].embedding_params > 0 == run.ranks[1].chunks[0].embedding_params
    table = format_table(run)
    assert "vpp 2" in table.splitlines()[0]


@pytest.mark.parametrize("argv, expected", [
    (["--dry-run", "--world-size", "63"], "--world-size 63 is not a multiple of parallel.tp * parallel.pp = 8"),
    (["--dry-run", "--world-size", "64", "--rank", "64"], "--rank 64 is outside the world of --world-size 64"),
    (["--dry-run", "--world-size", "64", "--rank", "-1"], "--rank -1 is outside"),
    (["--rank", "3"], "--rank is a dry-run option; add --dry-run"),
    (["--world-size", "64"], "--world-size is a dry-run option; add --dry-run"),
    (["--dry-run"], "--dry-run needs --world-size N"),
    (["--dry-run", "--world-size", "0"], "--world-size 0 must be at least 1"),
    (["--dry-run", "--world-size", "64", "--gpu-memory-gb", "0"], "--gpu-memory-gb 0.0 must be positive"),
    (["--dry-run", "--world-size", "64", "--mfu", "45"], "mfu = 45.0 must be in (0, 1]"),
    (["--mfu", "0.5"], "--mfu is a dry-run option; add --dry-run"),
    (["--dry-run", "--world-size", "64", "--gpu", "RTX 9090"], "no documented bf16 peak for GPU 'RTX 9090'"),
])
def test_bad_input_is_one_line_and_exit_2(capsys, argv, expected):
    rc = train_main([*argv, "--config", str(CONFIGS / "transfusion_7b_64gpu.yaml")])
    captured = capsys.readouterr()
    assert rc == 2
    assert captured.err.startswith(f"megafusion train: {expected}"), captured.err
    assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
    assert captured.out == ""


def test_an_invalid_layout_is_refused_by_validate(capsys):
    rc = train_main(["--dry-run", "--world-size", "64", "--set", "parallel.ep=3",
                     "--config", str(CONFIGS / "transfusion_moe_30b_a3b_256gpu.yaml")])
    err = capsys.readouterr().err
    assert rc == 2 and "parallel.ep" in err and "Traceback" not in err


def test_dry_run_skips_this_machines_memory_guard(capsys):
    """A 64-GPU config is not compared with the memory of the machine planning it."""
    from megafusion.training.memory import memory_problem

    cfg = load_config(CONFIGS / "transfusion_7b_64gpu.yaml", ["train.device=cpu", "model.seq_length=1000000",
                                                               "train.global_batch_size=8"])
    # Precondition: the guard would refuse this on this machine ...
    assert memory_problem(cfg, 64)
    # ... and validate skips it when asked (the dry run asks), but not by default.
    validate(cfg, 64, check_memory=False)
    with pytest.raises(Exception, match="memory"):
        validate(cfg, 64)
