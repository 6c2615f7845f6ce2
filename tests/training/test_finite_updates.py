"""Finite updates: a NaN/inf gradient is never applied, counted, and stops the run past
``train.max_skipped_steps``; no checkpoint holding NaN/inf is ever written.

Before the guard, ``optimizer.lr=1e6`` on tiny_text gave a finite loss but a NaN gradient at
step 3, which was applied and saved: exit 0 with an all-NaN final checkpoint.
"""

import pytest
import torch

from conftest import CONFIGS, read_metrics, run_train
from megafusion.training.checkpoint import complete_checkpoints

BLOW_UP = ["optimizer.lr=1e6", "logging.tensorboard=false"]  # step 3: finite loss, NaN gradients


def test_nan_gradient_with_finite_loss_stops_and_is_never_saved(tmp_path):
    proc = run_train(tmp_path, "tiny_text.yaml", BLOW_UP + ["train.steps=3", "checkpoint.every=1"], expect_rc=3)
    error = proc.stderr.strip().splitlines()[-1]
    assert "non-finite gradient (NaN or inf) at step 3 on rank 0, first in parameter " in error, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [1, 2]  # not the poisoned step 3
    assert [row["step"] for row in read_metrics(tmp_path)] == [1, 2]


def test_skipped_steps_are_counted_and_do_not_advance_the_schedule(tmp_path):
    proc = run_train(tmp_path, "tiny_text.yaml",
                     BLOW_UP + ["train.steps=8", "checkpoint.every=0", "train.max_skipped_steps=2",
                                "logging.every=4"], expect_rc=3)
    assert "at step 5 on rank 0" in proc.stderr and "3 skipped so far, train.max_skipped_steps = 2" in proc.stderr
    rows = {row["step"]: row for row in read_metrics(tmp_path)}
    # Skipped steps are logged whatever logging.every says, with the running count.
    assert sorted(rows) == [3, 4]
    assert [rows[s]["skipped_steps"] for s in (3, 4)] == [1, 2]
    # No update, no schedule step: step 4 ran at the LR step 3 would have had, on the same weights.
    assert rows[3]["lr"] == rows[4]["lr"]
    assert rows[3]["loss"] == pytest.approx(rows[4]["loss"], rel=1e-2)
    assert not complete_checkpoints(tmp_path)


# --------------------------------------------------------------------------- the guards, in process


@pytest.fixture(params=["fp32", "bf16"])
def model_and_optimizer(request, megatron_world):
    from megafusion.config import load_config
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes import get_provider
    from megafusion.parallel.setup import ParallelEnv
    from megafusion.training.loop import build_model_chunks
    from megafusion.training.optim import build_optimizer

    cfg = load_config(CONFIGS / "tiny_text.yaml", [f"train.precision={request.param}"])
    device = torch.device("cpu")
    transformer_config = build_transformer_config(cfg, device)
    env = ParallelEnv(rank=0, world_size=1, device=device, tp_rank=0, pp_rank=0, dp_rank=0, dp_size=1)
    chunks = build_model_chunks(cfg, transformer_config, get_provider(cfg, transformer_config), env)
    return chunks, build_optimizer(cfg, chunks)


POISONED = "decoder.layers.1.mlp.linear_fc1.weight"


def _set_grads(chunks, optimizer, poison: float | None = None):
    from megafusion.training.guards import named_parameters

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    for name, param in named_parameters(chunks):
        param.main_grad.fill_(0.01)
        if name == POISONED and poison is not None:
            param.main_grad[0, 0] = poison


def _snapshot(chunks, optimizer):
    from megafusion.training.guards import named_parameters

    params = {name: p.detach().clone() for name, p in named_parameters(chunks)}
    state = [v.clone() for opt in optimizer.chained_optimizers for s in opt.optimizer.state.values()
             for v in s.values() if torch.is_tensor(v)]
    return params, state


def _same(a, b):
    return a[0].keys() == b[0].keys() and all(torch.equal(a[0][k], b[0][k]) for k in a[0]) and \
        len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))


@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_gradient_changes_nothing(model_and_optimizer, poison):
    from megafusion.training.guards import optimizer_step, too_many_skips

    chunks, optimizer = model_and_optimizer
    device = torch.device("cpu")
    _set_grads(chunks, optimizer)
    assert optimizer_step(optimizer, chunks, device, loss_scaled=False).applied  # Adam state exists now
    before = _snapshot(chunks, optimizer)
    _set_grads(chunks, optimizer, poison)
    outcome = optimizer_step(optimizer, chunks, device, loss_scaled=False)
    assert not outcome.applied
    assert _same(before, _snapshot(chunks, optimizer)), "a skipped update changed parameters or optimizer state"
    error = too_many_skips(chunks, step=7, skipped=1, limit=0, device=device)
    assert f"at step 7 on rank 0, first in parameter {POISONED}" in str(error)
    _set_grads(chunks, optimizer)
    assert optimizer_step(optimizer, chunks, device, loss_scaled=False).applied
    assert not _same(before, _snapshot(chunks, optimizer))


def test_non_finite_tensors_are_never_saved(model_and_optimizer):
    from megafusion.training.guards import (NonFiniteCheckpointError, check_finite_for_save, named_parameters,
                                            optimizer_step)

    chunks, optimizer = model_and_optimizer
    device = torch.device("cpu")
    _set_grads(chunks, optimizer)
    optimizer_step(optimizer, chunks, device, loss_scaled=False)
    check_finite_for_save(chunks, optimizer, 1, device)  # all finite: no complaint

    # Adam's state, then a main (fp32) copy of a parameter, then the model parameter itself.
    inner = optimizer.chained_optimizers[0].optimizer
    first = inner.param_groups[0]["params"][0]
    inner.state[first]["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteCheckpointError, match=r"step 2: optimizer state 'exp_avg_sq' of \S+ on rank 0"):
        check_finite_for_save(chunks, optimizer, 2, device)
    inner.state[first]["exp_avg_sq"].view(-1)[0] = 0.0
    params = dict(named_parameters(chunks))
    if all(first is not p for p in params.values()):  # bf16: Adam steps fp32 main copies of bf16 parameters
        first.data.view(-1)[0] = float("nan")
        with pytest.raises(NonFiniteCheckpointError, match="step 3: the optimizer's main copy of embedding"):
            check_finite_for_save(chunks, optimizer, 3, device)
        first.data.view(-1)[0] = 0.0
    param = params[POISONED]
    param.data.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteCheckpointError, match=f"step 4: parameter {POISONED} on rank 0 holds NaN or inf"):
        check_finite_for_save(chunks, optimizer, 4, device)


def test_non_finite_loss_names_step_and_rank(megatron_world):
    from megafusion.training.guards import NonFiniteLossError, check_loss_finite

    device = torch.device("cpu")
    check_loss_finite([{"loss": torch.tensor([2.0, 8.0])}], 5, device)
    with pytest.raises(NonFiniteLossError, match="non-finite loss \\(NaN or inf\\) at step 5 on rank 0"):
        check_loss_finite([{"loss": torch.tensor([2.0, 8.0])}, {"loss": torch.tensor([float("nan"), 8.0])}], 5, device)
