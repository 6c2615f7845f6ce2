"""The trainer's background loader: same batches, same order, whatever the workers; resumes at a step."""

import os

import pytest
import torch

from megafusion.config import load_config
from megafusion.data.loader import StepLoader, default_num_workers
from megafusion.recipes.text import TextModelProvider


class StepProvider:
    """A recipe's batch function, micro_batches(step): two micro-batches derived from (step, rank) only, and who built them."""

    def micro_batches(self, step, dp_rank, dp_size):
        if step == 13:
            raise RuntimeError("step 13 is unreadable")
        g = torch.Generator().manual_seed(1000 * step + dp_rank)
        return [{"x": torch.randn(2, 3, generator=g), "step": torch.tensor([step, dp_rank, dp_size]),
                 "pid": torch.tensor(os.getpid())} for _ in range(2)]


def run(loader):
    with loader:
        return list(loader)


def test_workers_yield_the_in_process_batches_in_step_order():
    provider = StepProvider()
    inline = run(StepLoader(provider.micro_batches, 3, 11, dp_rank=1, dp_size=2))
    workers = run(StepLoader(provider.micro_batches, 3, 11, dp_rank=1, dp_size=2, num_workers=2, prefetch=2))
    assert len(inline) == len(workers) == 8
    for step, (a, b) in enumerate(zip(inline, workers), start=3):
        assert [m["step"].tolist() for m in a] == [[step, 1, 2]] * 2
        for ma, mb in zip(a, b):
            assert torch.equal(ma["x"], mb["x"]) and torch.equal(ma["step"], mb["step"])
    assert {int(m["pid"]) for s in inline for m in s} == {os.getpid()}
    assert os.getpid() not in {int(m["pid"]) for s in workers for m in s}  # built in other processes


def test_a_loader_started_at_step_k_continues_an_uninterrupted_one():
    provider = StepProvider()
    full = run(StepLoader(provider.micro_batches, 0, 10, num_workers=2))
    resumed = run(StepLoader(provider.micro_batches, 6, 10, num_workers=2))
    assert all(torch.equal(a["x"], b["x"]) for sa, sb in zip(full[6:], resumed) for a, b in zip(sa, sb))


def test_a_failing_step_raises_in_the_trainer():
    with pytest.raises(RuntimeError, match="step 13 is unreadable"):
        run(StepLoader(StepProvider().micro_batches, 10, 16, num_workers=2))


def test_text_provider_batches_through_worker_processes():
    cfg = load_config(os.path.join(os.path.dirname(__file__), "../../examples/configs/tiny_text.yaml"),
                      ["train.global_batch_size=8", "train.micro_batch_size=2"])
    provider = TextModelProvider(cfg, transformer_config=None)  # micro_batches needs no model
    got = run(StepLoader(provider.micro_batches, 2, 5, dp_rank=1, dp_size=2, num_workers=2))
    for step, micro in enumerate(got, start=2):
        want = provider.micro_batches(step, 1, 2)
        assert len(micro) == len(want) == 2
        assert all(torch.equal(a[k], b[k]) for a, b in zip(micro, want) for k in want[0])


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="start_step"):
        StepLoader(StepProvider().micro_batches, 5, 4)
    with pytest.raises(ValueError, match="data.prefetch"):
        StepLoader(StepProvider().micro_batches, 0, 4, num_workers=1, prefetch=0)
    assert default_num_workers("cpu") == 0 and default_num_workers("cuda") == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs a CUDA GPU; none is visible")
def test_batches_are_pinned_on_cuda():
    got = run(StepLoader(StepProvider().micro_batches, 0, 3, num_workers=2, pin_memory=True))
    assert all(m["x"].is_pinned() for s in got for m in s)
