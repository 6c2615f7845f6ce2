"""The dry run's figures equal what the real model holds, rank by rank, exactly.

Two torchrun launches (2 and 4 gloo processes) build several small layouts through the trainer's
own path (init_parallel, the provider, build_model_chunks with megatron DDP,
build_optimizer, one optimizer step) and reports per rank: parameter counts (total,
embedding, routed experts), parameter bytes, DDP's gradient buffer elements and the bytes
the optimizer holds (main weights and Adam's moments, measured by storage). This process
dry-runs each layout for each rank (meta device, fake process group) and compares.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megafusion.config import load_config, validate
from megafusion.parallel import cpu_compat
from megafusion.scaling.dry_run import rank_report

HERE = Path(__file__).resolve().parent
CONFIGS = HERE.parents[1] / "examples" / "configs"
TRANSFUSION, MOE = str(CONFIGS / "tiny_transfusion.yaml"), str(CONFIGS / "tiny_transfusion_moe.yaml")
# world size -> name -> (config, overrides). At 2 ranks: TP with SP, pipelines (tied
# embeddings on both ends, and interleaved chunks), EP with per-modality shared experts
# under the distributed optimizer (dense DP 2, expert DP 1), grouped experts, DP with the
# distributed optimizer. At 4: expert shards over an expert-DP group of 2 (dense DP 4), and
# TP x DP with the distributed optimizer. One torchrun launch per world size.
CASES = {
    2: {
        "tp2_sp_bf16": (TRANSFUSION, ["parallel.tp=2", "parallel.sp=true", "train.precision=bf16"]),
        "pp2_tied_fp32": (TRANSFUSION, ["parallel.pp=2"]),
        "pp2_vpp2_bf16": (TRANSFUSION, ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4",
                                        "train.precision=bf16"]),
        "ep2_moe_distopt_bf16": (MOE, ["parallel.ep=2", "parallel.distributed_optimizer=true",
                                       "train.precision=bf16"]),
        "ep2_grouped_fp32": (MOE, ["parallel.ep=2", "model.moe.experts=grouped"]),
        "dp2_distopt_bf16": (TRANSFUSION, ["parallel.distributed_optimizer=true", "train.precision=bf16"]),
    },
    4: {
        "ep2_edp2_distopt_bf16": (MOE, ["parallel.ep=2", "parallel.distributed_optimizer=true",
                                        "train.precision=bf16"]),
        "tp2_dp2_distopt_bf16": (TRANSFUSION, ["parallel.tp=2", "parallel.sp=true",
                                               "parallel.distributed_optimizer=true", "train.precision=bf16"]),
    },
}
PARAMS = [(world, name, rank) for world, cases in CASES.items() for name in cases for rank in range(world)]


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict[tuple[str, int], dict]:
    """(case, rank) -> the worker's figures, for every case (one torchrun launch per world size)."""
    results = {}
    for world, cases in CASES.items():
        out = tmp_path_factory.mktemp(f"world{world}")
        payload = [{"name": name, "config": config, "overrides": overrides}
                   for name, (config, overrides) in cases.items()]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
               str(HERE / "dry_run_exact_worker.py"), json.dumps(payload), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        lines = [json.loads(line) for path in sorted(out.glob("rank*.jsonl")) for line in path.read_text().splitlines()]
        assert len(lines) == world * len(cases), proc.stdout[-3000:]
        results.update({(r["case"], r["rank"]): r for r in lines})
    return results


@pytest.mark.parametrize("world, name, rank", PARAMS, ids=[f"{n}-rank{r}" for _, n, r in PARAMS])
def test_dry_run_equals_the_real_model(measured, world, name, rank):
    config, overrides = CASES[world][name]
    cfg = load_config(config, overrides)
    validate(cfg, world, check_memory=False)
    with cpu_compat.applied("cpu"):
        dry = rank_report(cfg, world, rank)
    real = measured[(name, rank)]
    assert real["adam_states"] > 0  # the step ran: the moments exist
    optimizer = dry.optimizer_bytes_distributed if cfg.parallel.distributed_optimizer else dry.optimizer_bytes
    assert {"params": dry.params, "embedding_params": dry.embedding_params, "expert_params": dry.expert_params,
            "param_bytes": dry.param_bytes, "grad_buffer_numel": dry.grad_buffer_numel,
            "optimizer_state_bytes": optimizer} == {k: real[k] for k in (
                "params", "embedding_params", "expert_params", "param_bytes", "grad_buffer_numel",
                "optimizer_state_bytes")}
    # The layouts exercise what they claim: experts where there are, chunks per vpp stage.
    assert (dry.expert_params > 0) == (config == MOE)
    assert len(dry.chunks) == (cfg.parallel.vpp or 1)
