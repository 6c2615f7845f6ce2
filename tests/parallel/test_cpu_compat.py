"""megafusion.parallel.cpu_compat: version guard, apply/remove, the rerouted CUDA sites, and one
2-process gloo launch (this file is also the worker it launches) checking tensor parallelism and
the gloo collectives against single-process float64 references."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megafusion.parallel import cpu_compat

REPO = Path(__file__).resolve().parents[2]
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only failure of the unpatched sites")


@pytest.fixture
def compat():
    """cpu_compat applied for the test; the process is left as it was found."""
    was_active = cpu_compat.is_active()
    assert cpu_compat.apply("cpu") is True
    yield cpu_compat
    if not was_active:
        cpu_compat.remove()


def assert_not_leaked():
    """These tests need megatron unpatched: a layer still active here is a leak (every test and
    fixture that applies it removes it: cpu_layer, megatron_world, cpu_compat.applied)."""
    assert not cpu_compat.is_active() and not cpu_compat.torch_adam_fixes_active(), (
        "megafusion's CPU compatibility layer (or its torch-Adam fixes) is active before this test: an "
        "earlier test, fixture or entry point applied it and did not remove it")


def _patched_sites():
    """The objects apply() replaces, read from where megatron uses them."""
    import importlib

    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer
    from megatron.core.tensor_parallel import mappings, random
    from megatron.core.transformer.moe import token_dispatcher

    sites = {name: importlib.import_module(name).torch for name in cpu_compat._MEGATRON_MODULES}
    sites.update({
        "random._get_cuda_rng_state": random._get_cuda_rng_state,
        "CudaRNGStatesTracker.fork": random.CudaRNGStatesTracker.__dict__["fork"],
        "token_dispatcher.all_to_all": token_dispatcher.all_to_all,
        "mappings._gather_along_first_dim": mappings._gather_along_first_dim,
        "optimizer.clip_grad_by_total_norm_fp32": optimizer.clip_grad_by_total_norm_fp32,
        "clip_grads.clip_grad_by_total_norm_fp32": clip_grads.clip_grad_by_total_norm_fp32,
        "DistributedOptimizer.__init__": distrib_optimizer.DistributedOptimizer.__dict__["__init__"],
        "Tensor.type": torch.Tensor.type,
    })
    return sites


# --------------------------------------------------------------------------- version guard


def test_version_guard_names_both_versions_and_the_fix(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.20.1+deadbee")
    with pytest.raises(cpu_compat.MegatronVersionError) as error:
        cpu_compat.check_megatron_version()
    message = str(error.value)
    assert "0.20.1+deadbee" in message
    assert f"megatron-core=={cpu_compat.SUPPORTED_MEGATRON_CORE}" in message
    assert "pip install" in message


def test_apply_refuses_another_version_and_patches_nothing(monkeypatch):
    import megatron.core

    assert_not_leaked()
    before = _patched_sites()
    monkeypatch.setattr(megatron.core, "__version__", "0.18.0")
    with pytest.raises(cpu_compat.MegatronVersionError):
        cpu_compat.apply("cpu")
    assert not cpu_compat.is_active()
    assert _patched_sites() == before


def test_version_guard_ignores_local_build_suffix(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", cpu_compat.SUPPORTED_MEGATRON_CORE + "+f6a5b40")
    cpu_compat.check_megatron_version()
    monkeypatch.setattr(cpu_compat, "SUPPORTED_MEGATRON_CORE", "0.19.3")
    with pytest.raises(cpu_compat.MegatronVersionError, match="0.19.3"):
        cpu_compat.check_megatron_version()


# --------------------------------------------------------------------------- apply / remove


def _torch_adam_sites():
    from megatron.core.optimizer import distrib_optimizer

    cls = distrib_optimizer.DistributedOptimizer
    return {name: cls.__dict__.get(name)
            for name in ("sharded_state_dict", "load_state_dict", "_set_main_param_and_optimizer_states")}


def test_apply_cuda_changes_nothing(monkeypatch):
    """With TE or Apex present (megatron's flag, mocked) a CUDA device patches nothing."""
    from megatron.core.optimizer import distrib_optimizer

    assert_not_leaked()
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", True)
    before, adam_before = _patched_sites(), _torch_adam_sites()
    assert cpu_compat.apply("cuda") is False
    assert cpu_compat.apply(torch.device("cuda", 0)) is False
    assert not cpu_compat.is_active() and not cpu_compat.torch_adam_fixes_active()
    assert _patched_sites() == before and _torch_adam_sites() == adam_before


def test_apply_cuda_without_te_and_apex_fixes_the_torch_adam_checkpoints(monkeypatch):
    """A GPU machine without TE/Apex runs megatron's torch-Adam path, as every CPU does: the
    distributed optimizer's checkpoint fixes are applied there too, and nothing else."""
    from megatron.core.optimizer import distrib_optimizer

    assert_not_leaked()
    monkeypatch.setattr(distrib_optimizer, "HAVE_APEX_OR_TE", False)
    before, adam_before = _patched_sites(), _torch_adam_sites()
    try:
        assert cpu_compat.apply(torch.device("cuda", 1)) is False
        assert not cpu_compat.is_active() and cpu_compat.torch_adam_fixes_active()
        assert _patched_sites() == before  # no CPU rerouting on a GPU
        fixed = _torch_adam_sites()
        assert all(fixed[name] is not adam_before[name] for name in fixed)
        assert cpu_compat.apply("cuda") is False and _torch_adam_sites() == fixed  # applied once
    finally:
        cpu_compat.remove()
    assert not cpu_compat.torch_adam_fixes_active() and _torch_adam_sites() == adam_before
    with cpu_compat.applied("cuda") as on_gpu:  # the entry points' form: removed on exit
        assert on_gpu is False and cpu_compat.torch_adam_fixes_active()
    assert not cpu_compat.torch_adam_fixes_active() and _torch_adam_sites() == adam_before
    # the CPU layer includes the same fixes
    with cpu_compat.applied("cpu"):
        assert cpu_compat.torch_adam_fixes_active()
        with cpu_compat.applied("cuda"):
            pass
        assert cpu_compat.torch_adam_fixes_active()  # the inner block did not remove the outer's
    assert _torch_adam_sites() == adam_before


def test_apply_is_idempotent_and_remove_restores():
    assert_not_leaked()
    before = _patched_sites()
    assert cpu_compat.apply("cpu") is True
    patched = _patched_sites()
    assert patched["megatron.core.tensor_parallel.layers"] is not torch
    assert patched["megatron.core.tensor_parallel.layers"].cuda.current_device() == torch.device("cpu")
    assert cpu_compat.apply("cpu") is True  # second call: no second layer of patches
    assert _patched_sites() == patched
    assert cpu_compat.is_active()
    cpu_compat.remove()
    assert not cpu_compat.is_active()
    assert _patched_sites() == before


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="meta"):
        cpu_compat.apply("meta")
    with pytest.raises(ValueError, match="meta"):
        with cpu_compat.applied("meta"):
            pass
    assert not cpu_compat.is_active()


def test_applied_removes_only_what_it_applied():
    assert_not_leaked()
    before = _patched_sites()
    with cpu_compat.applied("cpu") as outer:
        assert outer is True and cpu_compat.is_active()
        patched = _patched_sites()
        with cpu_compat.applied(torch.device("cpu")) as inner:  # nested (quickstart -> train, eval)
            assert inner is True
            assert _patched_sites() == patched
        assert cpu_compat.is_active(), "the inner block removed the outer block's layer"
        with cpu_compat.applied("cuda") as on_gpu:  # a CUDA device changes nothing, even inside
            assert on_gpu is False and cpu_compat.is_active()  # the outer layer stays
        assert cpu_compat.is_active()
    assert not cpu_compat.is_active()
    assert _patched_sites() == before
    with cpu_compat.applied("cuda") as on_gpu:
        assert on_gpu is False and not cpu_compat.is_active()
    with pytest.raises(KeyError):  # an error inside the block still removes it
        with cpu_compat.applied("cpu"):
            raise KeyError("boom")
    assert not cpu_compat.is_active()
    assert _patched_sites() == before


def test_init_parallel_on_cpu_needs_the_layer():
    """init_parallel only builds process groups: on CPU without the layer it says what to do,
    and starts nothing."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from conftest import CONFIGS

    from megafusion.config import load_config
    from megafusion.parallel.setup import init_parallel

    assert_not_leaked()
    cfg = load_config(CONFIGS / "tiny_text.yaml", ["train.device=cpu"])
    was_initialized = dist.is_initialized(), parallel_state.model_parallel_is_initialized()
    with pytest.raises(RuntimeError) as error:
        init_parallel(cfg)
    message = str(error.value)
    assert 'megafusion.parallel.cpu_compat.apply("cpu")' in message
    assert "cpu_compat.applied" in message
    assert not cpu_compat.is_active(), "init_parallel applied the layer itself"
    assert (dist.is_initialized(), parallel_state.model_parallel_is_initialized()) == was_initialized


def test_train_main_leaves_the_layer_as_it_found_it(tmp_path):
    """`megafusion train` in this process applies the layer for its run and removes it after."""
    from conftest import CONFIGS

    from megafusion import train

    assert_not_leaked()
    rc = train.main(["--config", str(CONFIGS / "tiny_text.yaml"), "--run-dir", str(tmp_path / "run"),
                     "--set", "train.steps=2", "--set", "schedule.warmup_steps=1", "--set", "train.device=cpu", "--set", "checkpoint.every=0",
                     "--set", "checkpoint.save_final=false", "--set", "logging.tensorboard=false"])
    assert rc == 0
    assert (tmp_path / "run" / "metrics.jsonl").is_file()
    assert not cpu_compat.is_active(), "megafusion.train.main left the CPU compatibility layer active"


# --------------------------------------------------------------------------- patched sites


def test_torch_outside_megatron_is_untouched(compat):
    assert torch.zeros(1, device="cpu").device.type == "cpu"
    assert torch.ones(2).type() == "torch.FloatTensor"  # only inside the wrapped functions
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")


def test_rng_tracker_forks_the_cpu_generator(compat):
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(123, tp_rank=1, ep_rank=0, etp_rank=0,
                                                    force_reset_rng=True)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    default = torch.Generator().manual_seed(123)  # data-parallel seed = seed
    model_parallel = torch.Generator().manual_seed(123 + 2718 + 1)  # offset + tp_rank

    a = torch.randn(4)
    with tracker.fork():
        b = torch.randn(4)
        with tracker.fork("expert-parallel-rng"):
            torch.randn(2)
        b2 = torch.randn(4)
    c = torch.randn(4)
    assert torch.equal(a, torch.randn(4, generator=default))
    assert torch.equal(c, torch.randn(4, generator=default))  # fork left the default stream alone
    assert torch.equal(b, torch.randn(4, generator=model_parallel))
    assert torch.equal(b2, torch.randn(4, generator=model_parallel))  # nested fork restored it

    saved = {k: v.clone() for k, v in tracker.get_states().items()}
    with tracker.fork():
        first = torch.randn(3)
    tracker.set_states(saved)
    with tracker.fork():
        assert torch.equal(torch.randn(3), first)


def test_rotary_embedding_builds_on_cpu(compat):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)
    expected = 1.0 / 10000 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    torch.testing.assert_close(rope.inv_freq.double(), expected)
    assert rope(5).shape == (5, 1, 1, 8)


@cpu_only
def test_rotary_embedding_needs_the_layer_on_cpu():
    assert_not_leaked()
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    with pytest.raises((AssertionError, RuntimeError)):
        RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)


def test_gradient_clip_scales_cpu_grads(compat):
    from megatron.core.optimizer import optimizer

    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    grads = [torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 1.0)]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    total = float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)))
    optimizer.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=total)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad.double(), g.double() / (total + 1e-6))
    assert params[0].grad.type() == "torch.FloatTensor"  # the type shim ended with the call


def test_split_sizes_become_lists():
    import numpy as np

    assert cpu_compat._as_split_list(torch.tensor([3, 1])) == [3, 1]
    assert cpu_compat._as_split_list(np.array([2, 0, 5])) == [2, 0, 5]
    assert cpu_compat._as_split_list(None) is None
    assert cpu_compat._as_split_list([1, 2]) == [1, 2]


# --------------------------------------------------------------------------- 2-process gloo launch


def test_tensor_parallel_two_process_gloo_matches_single_process(tmp_path):
    """One torchrun launch of this file's worker; every check is an assertion there."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           __file__]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, f"--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n{proc.stderr[-6000:]}"
    assert proc.stdout.count("cpu_compat worker ok") == 2, proc.stdout


def _worker() -> None:
    """TP=2 on gloo: Column->Row parallel MLP (weights initialized through the forked RNG
    tracker) equals the dense float64 computation from the gathered weights, forward and
    backward; all_to_all with tensor split sizes; uneven all-gather / reduce-scatter; batched
    pipeline p2p with previous rank == next rank."""
    import torch.distributed as dist

    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import mappings

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=2)
    torch.manual_seed(0)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    rank, group = dist.get_rank(), parallel_state.get_tensor_model_parallel_group()

    config = ModelParallelConfig(tensor_model_parallel_size=2, use_cpu_initialization=False,
                                 params_dtype=torch.float32)
    init = lambda w: torch.nn.init.normal_(w, std=0.5)  # noqa: E731
    fc1 = tensor_parallel.ColumnParallelLinear(6, 8, config=config, init_method=init, bias=True,
                                               gather_output=False)
    fc2 = tensor_parallel.RowParallelLinear(8, 5, config=config, init_method=init, bias=True,
                                            input_is_parallel=True, skip_bias_add=False)
    # The forked tracker gives the two TP ranks different draws (as on GPU).
    shards = [torch.empty_like(fc1.weight) for _ in range(2)]
    dist.all_gather(shards, fc1.weight.detach(), group=group)
    assert not torch.equal(shards[0], shards[1]), "TP ranks drew identical weight shards"

    def gather(t, dim):
        parts = [torch.empty_like(t) for _ in range(2)]
        dist.all_gather(parts, t.detach().contiguous(), group=group)
        return torch.cat(parts, dim).double()

    w1, b1, w2 = gather(fc1.weight, 0), gather(fc1.bias, 0), gather(fc2.weight, 1)
    b2 = fc2.bias.detach().double()

    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(1), requires_grad=True)
    hidden, _ = fc1(x)
    out, _ = fc2(torch.nn.functional.gelu(hidden))
    out.sum().backward()

    x64 = x.detach().double().requires_grad_()
    ref = torch.nn.functional.gelu(x64 @ w1.T + b1) @ w2.T + b2
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)

    # all_to_all with tensor split sizes (what the alltoall MoE dispatcher passes on CPU).
    send_sizes = torch.tensor([1, 2]) if rank == 0 else torch.tensor([3, 1])
    recv_sizes = torch.tensor([1, 3]) if rank == 0 else torch.tensor([2, 1])
    payload = torch.arange(int(send_sizes.sum()), dtype=torch.float32)[:, None] + 10 * rank
    received = tensor_parallel.all_to_all(group, payload, recv_sizes, send_sizes)
    expected = (torch.tensor([[0.0], [10.0], [11.0], [12.0]]) if rank == 0
                else torch.tensor([[1.0], [2.0], [13.0]]))
    torch.testing.assert_close(received, expected)

    # Uneven all-gather and reduce-scatter (expert TP under the alltoall dispatcher).
    mine = torch.full((rank + 1, 2), float(rank + 1))
    gathered = mappings._gather_along_first_dim(mine, group, output_split_sizes=[1, 2])
    torch.testing.assert_close(gathered, torch.tensor([[1.0, 1], [2, 2], [2, 2]]))
    full = torch.arange(6, dtype=torch.float32).reshape(3, 2) * (rank + 1)
    reduced = mappings._reduce_scatter_along_first_dim(full, group, input_split_sizes=[1, 2])
    total = torch.arange(6, dtype=torch.float32).reshape(3, 2) * 3
    torch.testing.assert_close(reduced, total[:1] if rank == 0 else total[1:])

    # Batched pipeline p2p with 2 ranks: the peer is both previous and next stage (interleaved
    # schedule); an activation (to next) and a gradient (to prev) of one shape must not swap.
    from megatron.core.pipeline_parallel import p2p_communication

    check_batched_p2p(p2p_communication._batched_p2p_ops)

    dist.barrier()
    dist.destroy_process_group()
    print("cpu_compat worker ok", flush=True)


def check_batched_p2p(batched_p2p_ops) -> None:
    import torch.distributed as dist

    rank, peer = dist.get_rank(), 1 - dist.get_rank()
    activation, gradient = torch.full((4,), 10.0 + rank), torch.full((4,), 20.0 + rank)
    from_prev, from_next = torch.empty(4), torch.empty(4)
    for request in batched_p2p_ops(tensor_send_prev=gradient, tensor_recv_prev=from_prev,
                                   tensor_send_next=activation, tensor_recv_next=from_next,
                                   group=dist.group.WORLD, prev_pipeline_rank=peer,
                                   next_pipeline_rank=peer):
        request.wait()
    torch.testing.assert_close(from_prev, torch.full((4,), 10.0 + peer), msg="activation swapped")
    torch.testing.assert_close(from_next, torch.full((4,), 20.0 + peer), msg="gradient swapped")


if __name__ == "__main__":
    with cpu_compat.applied("cpu"):
        _worker()
