"""megafusion.scaling.activations against the bytes the real model saves for backward.

The reference is counted (tests/scaling/saved_bytes_worker.py): the Transfusion model built
through the trainer's path (get_provider + build_transformer_config) runs one training
forward under ``saved_tensors_hooks``; every distinct non-parameter storage saved for backward
is summed once. Per layer = count(L+1 layers) - count(L); outside = count(L) - L * per layer.

The formula's terms were read off shapes s=64, h=64, a=4, f=128, b=2; every case here uses
other (held-out) shapes: other s, h, heads, head dim, micro-batch, FFN widths, expert counts
and image fractions. ``device_type="cpu"`` must match within 10% (the CUDA-only assumptions
are stated in the module docstring and cannot be counted on this machine).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import saved_bytes_worker as worker  # noqa: E402

from megafusion.scaling.activations import ActivationEstimate, activation_memory, in_flight_microbatches  # noqa: E402

TOLERANCE = 0.10

# held-out shapes (the terms were derived at s=64, h=64, a=4, f=128, b=2)
A = {"model.seq_length": 48, "model.hidden_size": 96, "model.num_heads": 6, "model.ffn_hidden_size": 160,
     "train.micro_batch_size": 3}
B = {"model.seq_length": 40, "model.hidden_size": 64, "model.num_heads": 2, "model.ffn_hidden_size": 96,
     "train.micro_batch_size": 2}
MOE8 = {"model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.ffn_hidden_size": 40,
        "model.moe.shared_expert_ffn_hidden_size": 56, "model.moe.per_modality_shared_experts": True}

CASES_TP1 = {
    "sdpa-dense-swiglu-rms-additive-text-only": ({**A}, 0),
    "flex-gelu-layernorm-adaln-gqa": ({**A, "model.num_kv_heads": 2, "model.activation": "gelu",
                                       "model.normalization": "layernorm", "model.time_conditioning": "adaln",
                                       "model.attention": "flex"}, 20),
    "flex-selective": ({**B, "train.recompute": "selective", "model.attention": "flex"}, 20),
    "sdpa-full-adaln": ({**B, "train.recompute": "full", "model.time_conditioning": "adaln"}, 20),
    "sdpa-modality-ffn-adaln": ({**B, "model.ffn": "modality", "model.time_conditioning": "adaln"}, 24),
    "sdpa-moe-per-modality-shared": ({**A, **MOE8}, 20),
    "moe-grouped-allgather-sigmoid-aux-loss": ({**B, **MOE8, "model.moe.experts": "grouped",
                                                "model.moe.dispatcher": "allgather", "model.moe.router_score": "sigmoid",
                                                "model.moe.aux_loss_coeff": 0.01, "model.moe.z_loss_coeff": 0.001}, 24),
    "bf16-adaln-moe-global-shared": ({**A, "train.precision": "bf16", "model.time_conditioning": "adaln",
                                      "model.moe.num_experts": 6, "model.moe.top_k": 3, "model.moe.ffn_hidden_size": 40,
                                      "model.moe.shared_expert_ffn_hidden_size": 56}, 20),
    "bf16-flex-layernorm-gqa-selective": ({**B, "train.precision": "bf16", "model.attention": "flex",
                                           "model.normalization": "layernorm", "model.num_heads": 4,
                                           "model.num_kv_heads": 2, "train.recompute": "selective"}, 0),
    # pipeline stages built alone: the first (embeddings, no final norm / heads), the last (input received)
    "pp-first-stage-bf16-adaln": ({**A, "train.precision": "bf16", "model.time_conditioning": "adaln"}, 20, "first"),
    "pp-last-stage-layernorm": ({**A, "model.normalization": "layernorm"}, 20, "last"),
    # Triton under its CPU interpreter: one tiny shape (about 10 s)
    "triton-tiny": ({"model.seq_length": 32, "model.hidden_size": 32, "model.num_heads": 2,
                     "model.ffn_hidden_size": 64, "train.micro_batch_size": 1, "model.attention": "triton"}, 12),
}

TP2 = {"parallel.tp": 2}
CASES_TP2 = {
    "tp2-sdpa-gqa": ({**A, **TP2, "parallel.sp": False, "model.num_kv_heads": 2}, 20),
    "tp2-sp-flex-adaln-modality-ffn": ({**A, **TP2, "parallel.sp": True, "model.attention": "flex",
                                        "model.time_conditioning": "adaln", "model.ffn": "modality"}, 20),
    "tp2-sp-moe-per-modality-shared": ({**A, **TP2, "parallel.sp": True, **MOE8}, 20),
    # expert parallelism (2 ranks, same batch on both): routed rows per rank depend on the routing
    "ep2-moe-alltoall": ({**A, "parallel.ep": 2, **MOE8}, 20),
    "tp2-sp-selective-layernorm": ({**B, **TP2, "parallel.sp": True, "train.recompute": "selective",
                                    "model.normalization": "layernorm"}, 0),
    "tp2-sp-full": ({**B, **TP2, "parallel.sp": True, "train.recompute": "full"}, 20),
    "tp2-sp-bf16-adaln": ({**B, **TP2, "parallel.sp": True, "train.precision": "bf16",
                           "model.time_conditioning": "adaln"}, 20),
}


def case_of(name, table):
    overrides, image, *stage = table[name]
    return {"name": name, "set": overrides, "image": image, **({"stage": stage[0]} if stage else {})}


def check(case, counted):
    stage = case.get("stage")
    if stage is None:
        est = activation_memory(worker.config(case, 1), device_type="cpu")
    else:
        # the stage's model was built alone (pp = 1, one layer); predict pipeline rank 0 / 1 of pp = 2
        cfg = worker.config({**case, "set": {**case["set"], "parallel.pp": 2}}, 2)
        est = activation_memory(cfg, pp_rank=0 if stage == "first" else 1, device_type="cpu")
    for key, predicted in (("per_layer", est.per_layer), ("outside", est.outside_layers),
                           ("total", est.per_layer + est.outside_layers)):
        ref = counted[key]
        assert ref > 0, (case["name"], key, counted)
        assert abs(predicted / ref - 1) <= TOLERANCE, (
            f"{case['name']}: {key} predicted {predicted} B, counted {ref} B ({predicted / ref - 1:+.1%})")
    print(f"{case['name']}: per layer counted {counted['per_layer']} predicted {est.per_layer} "
          f"({est.per_layer / counted['per_layer'] - 1:+.2%}); outside counted {counted['outside']} "
          f"predicted {est.outside_layers} ({est.outside_layers / counted['outside'] - 1:+.2%})")


@pytest.mark.parametrize("name", list(CASES_TP1))
def test_formula_matches_counted_bytes_tp1(name, megatron_world):
    case = case_of(name, CASES_TP1)
    check(case, worker.count(case))


@pytest.fixture(scope="module")
def tp2_counts(tmp_path_factory):
    cases = [case_of(name, CASES_TP2) for name in CASES_TP2]
    path = tmp_path_factory.mktemp("tp2") / "cases.json"
    path.write_text(json.dumps(cases))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "saved_bytes_worker.py"), str(path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("WORKER OK") == 2, proc.stdout[-3000:]
    out = {}
    for line in proc.stdout.splitlines():
        if line.startswith("COUNT "):
            row = json.loads(line[len("COUNT "):])
            out[row["case"]["name"]] = row
    return out


@pytest.mark.parametrize("name", list(CASES_TP2))
def test_formula_matches_counted_bytes_tp2(name, tp2_counts):
    check(case_of(name, CASES_TP2), tp2_counts[name])


# --------------------------------------------------------------------------- schedule and composition


def test_in_flight_microbatches_follow_the_1f1b_schedules():
    assert [in_flight_microbatches(4, r, 8) for r in range(4)] == [4, 3, 2, 1]
    assert in_flight_microbatches(4, 0, 2) == 2  # capped by the micro-batches of a step
    assert in_flight_microbatches(1, 0, None) == 1
    # interleaved: (pp - r - 1) * 2 + (vpp - 1) * pp warm-up chunk forwards, plus one
    assert in_flight_microbatches(4, 0, 16, vpp=2) == 3 * 2 + 4 + 1
    assert in_flight_microbatches(4, 3, 16, vpp=2) == 0 + 4 + 1
    assert in_flight_microbatches(4, 0, 2, vpp=2) == 4  # capped by micro-batches x chunks


def test_estimate_total_and_pipeline_ranks():
    cfg = worker.config({"set": {**A, "parallel.pp": 2, "train.global_batch_size": 12}, "image": 0}, 4)
    first = activation_memory(cfg, pp_rank=0, num_microbatches=4)
    last = activation_memory(cfg, pp_rank=1, num_microbatches=4)
    assert first.layers == last.layers == 2 and (first.in_flight, last.in_flight) == (2, 1)
    assert first.per_layer == last.per_layer
    assert first.total == 2 * (2 * first.per_layer + first.outside_layers)
    assert last.total == 2 * last.per_layer + last.outside_layers
    # the last stage holds the fp32 logits for the cross-entropy: [s, b, V] * 4 bytes at least
    assert last.outside_layers >= 48 * 3 * 272 * 4
    assert isinstance(first, ActivationEstimate)
    with pytest.raises(ValueError):
        activation_memory(cfg, pp_rank=2)


def test_recompute_and_sequence_parallel_order_the_estimates():
    def per_layer(**over):
        return activation_memory(worker.config({"set": {**A, **over}, "image": 0}, 1)).per_layer

    none, selective, full = (per_layer(**{"train.recompute": r}) for r in ("none", "selective", "full"))
    assert full < selective < none
    assert full == 48 * 3 * 96 * 4  # the layer input only
    tp2 = per_layer(**{"parallel.tp": 2})
    tp2_sp = per_layer(**{"parallel.tp": 2, "parallel.sp": True})
    assert tp2_sp < tp2 < none


def test_cuda_assumptions_differ_from_cpu_where_stated():
    cfg = worker.config({"set": {**A, "model.attention": "flex"}, "image": 0}, 1)
    cpu, cuda = activation_memory(cfg, device_type="cpu"), activation_memory(cfg, device_type="cuda")
    s, b, h, a = 48, 3, 96, 6
    # fused rms_norm on CUDA keeps no fp32 x * rsqrt (two norms), and compiled flex one logsumexp
    assert cpu.per_layer - cuda.per_layer == 2 * s * b * h * 4 + b * a * s * 4
    gqa = worker.config({"set": {**A, "model.num_kv_heads": 2}, "image": 0}, 1)
    # sdpa on CUDA repeats k/v to all a heads (q, k, v: 3a heads) where the CPU kernel saves the
    # qkv storage (a + 2g) and the rotated q, k (a + g); the norms differ as above
    g, d = 2, h // a
    heads_cpu_minus_cuda = (a + 2 * g) + (a + g) - 3 * a
    assert (activation_memory(gqa, device_type="cpu").per_layer - activation_memory(gqa, device_type="cuda").per_layer
            == 2 * s * b * h * 4 + heads_cpu_minus_cuda * s * b * d * 4)
    with pytest.raises(ValueError):
        activation_memory(cfg, device_type="tpu")


def test_closed_form_in_the_docs():
    """docs/scaling.md's Korthikanti-style form (bf16, CUDA, flex, no GQA, TP + SP) is the function's."""
    s, b, h, a, t = 512, 2, 256, 8, 2
    d = h // a
    for act, f, mlp in (("gelu", 4 * h, 4), ("swiglu", 688, 10)):
        cfg = worker.config({"set": {"model.seq_length": s, "model.hidden_size": h, "model.num_heads": a,
                                     "model.ffn_hidden_size": f, "train.micro_batch_size": b, "parallel.tp": t,
                                     "parallel.sp": True, "model.attention": "flex", "train.precision": "bf16",
                                     "model.activation": act}, "image": 0}, 1)
        closed = s * b * h * (20 / t + mlp * f / (h * t)) + 8 * s * b * d + 4 * b * a * s / t + 8 * s * b / t
        assert activation_memory(cfg, device_type="cuda").per_layer == closed
