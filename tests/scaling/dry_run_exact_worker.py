"""torchrun worker of tests/scaling/test_dry_run_exact.py: builds real models through the
trainer's own path and prints what each rank holds.

    python -m torch.distributed.run --standalone --nproc_per_node 2 dry_run_exact_worker.py CASES_JSON OUT_DIR

CASES_JSON: [{"name": ..., "config": path, "overrides": [...]}, ...]. For each case, in one
gloo world: ``init_parallel`` (megatron's groups for the case's layout), the provider,
``build_model_chunks`` (megatron DDP), ``build_optimizer`` and one optimizer step (zero
gradients: the step creates torch Adam's moments), then one JSON line per case in
OUT_DIR/rank<R>.jsonl (files, not stdout: the ranks' lines would interleave in one pipe).
Megatron's groups are torn down between cases; the process group stays.

Optimizer bytes are measured, not derived: every tensor the optimizer holds (its param
groups' main weights and the tensors in its state, Adam's scalar ``step`` excluded) whose
storage is not the model's (parameters, DDP's param and grad buffers) counts once.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist


def _inner_optimizers(optimizer):
    return [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]


def measure(chunks, optimizer) -> dict[str, int]:
    named = [(n, p) for ddp in chunks for n, p in ddp.module.named_parameters()]
    buffers = [b for ddp in chunks for b in ddp.buffers + ddp.expert_parallel_buffers]
    model_storages = {p.untyped_storage().data_ptr() for _, p in named}
    for b in buffers:
        for t in (b.param_data, b.grad_data):
            if t is not None:
                model_storages.add(t.untyped_storage().data_ptr())
    seen, optimizer_bytes = set(), 0
    for inner in _inner_optimizers(optimizer):
        held = [p for group in inner.param_groups for p in group["params"]]
        held += [t for state in inner.state.values() for key, t in state.items()
                 if torch.is_tensor(t) and key != "step"]
        for t in held:
            ptr = t.untyped_storage().data_ptr()
            if ptr in model_storages or (ptr, t.storage_offset()) in seen:
                continue
            seen.add((ptr, t.storage_offset()))
            optimizer_bytes += t.numel() * t.element_size()
    return {
        "params": sum(p.numel() for _, p in named),
        "embedding_params": sum(p.numel() for n, p in named
                                if n.endswith("embedding.word_embeddings.weight") or n.endswith("output_layer.weight")),
        "expert_params": sum(p.numel() for n, p in named if ".mlp.experts." in n),
        "param_bytes": sum(p.numel() * p.element_size() for _, p in named),
        "grad_buffer_numel": sum(b.grad_data.numel() for b in buffers),
        "optimizer_state_bytes": optimizer_bytes,
        "adam_states": sum(len(inner.state) for inner in _inner_optimizers(optimizer)),
    }


def run_case(case: dict) -> dict:
    from megatron.core import parallel_state as ps

    from megafusion.config import load_config, validate
    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.parallel.setup import init_parallel
    from megafusion.recipes import get_provider
    from megafusion.training.loop import build_model_chunks
    from megafusion.training.optim import build_optimizer

    cfg = load_config(case["config"], case["overrides"])
    validate(cfg, int(os.environ["WORLD_SIZE"]))
    env = init_parallel(cfg)
    try:
        transformer_config = build_transformer_config(cfg, env.device)
        provider = get_provider(cfg, transformer_config)
        chunks = build_model_chunks(cfg, transformer_config, provider, env)
        optimizer = build_optimizer(cfg, chunks)
        for ddp in chunks:
            ddp.zero_grad_buffer()
        optimizer.step()  # torch Adam creates its moments on the first step
        return {"case": case["name"], "rank": env.rank, **measure(chunks, optimizer)}
    finally:
        ps.destroy_model_parallel()


if __name__ == "__main__":
    from megafusion.parallel import cpu_compat

    torch.set_num_threads(1)
    cases, out_dir = json.loads(sys.argv[1]), sys.argv[2]
    with cpu_compat.applied("cpu"):  # this worker process, as an entry point would
        lines = [json.dumps(run_case(case)) for case in cases]
        with open(os.path.join(out_dir, f"rank{dist.get_rank()}.jsonl"), "w") as f:
            f.write("\n".join(lines) + "\n")
        dist.destroy_process_group()
