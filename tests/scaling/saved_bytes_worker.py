"""Counts the bytes the real megafusion model saves for backward (the reference that
megafusion.scaling.activations is tested against), in-process or as a torchrun worker.

``count(cfg, packing-like spec)`` builds the Transfusion model through the trainer's own path
(``get_provider`` + ``build_transformer_config``), runs one training forward under
``torch.autograd.graph.saved_tensors_hooks`` and sums, once per untyped storage, the bytes of
every storage saved for backward that is not a parameter. Per layer = the count with L+1
layers minus the count with L layers; outside = the L-layer count minus L per-layer counts.

As a torchrun worker (2 gloo ranks) it reads the cases as JSON from argv[1] (each case's
``parallel.tp`` / ``parallel.ep`` set the model-parallel groups; both ranks run the same batch)
and prints one ``COUNT <json>`` line per case from rank 0.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from megafusion.data.sample import IMAGE, TEXT

BASE = ["model.kind=transfusion", "model.vocab_size=272", "model.patch_adapter=linear", "model.image_positions=1d",
        "train.device=cpu", "parallel.pp=1", "parallel.ep=1", "parallel.distributed_optimizer=false",
        "data.kind=shapes"]


def config(case: dict, num_layers: int):
    from megafusion.config import load_config

    over = [*BASE, f"model.num_layers={num_layers}"]
    for key, value in case["set"].items():
        over.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return load_config("examples/configs/tiny_transfusion.yaml", over)


def hand_batch(b: int, s: int, image: int, latent_dim: int, seed: int = 0):
    """b rows of s positions: text, then one image span of ``image`` positions, then text to the end."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 256, (b, s), generator=g)
    modality = torch.full((b, s), TEXT)
    span = torch.full((b, s), -1)
    start = max(1, (s - image) // 2)
    if image:
        modality[:, start:start + image] = IMAGE
        span[:, start:start + image] = 0
    doc = torch.zeros(b, s, dtype=torch.long)
    positions = torch.arange(s)[None].expand(b, s).contiguous()
    is_latent = (modality != TEXT).unsqueeze(-1)
    latents = torch.randn(b, s, latent_dim, generator=g) * is_latent
    t = torch.rand(b, s, generator=g) * (modality != TEXT)
    labels = torch.randint(0, 256, (b, s), generator=g)
    return dict(tokens=tokens, positions=positions, attention_mask=torch.stack([doc, span]), latents=latents,
                timesteps=t, modality=modality, labels=labels)


def saved_bytes(model, batch) -> tuple[int, list]:
    """Bytes of the distinct non-parameter storages saved for backward by one forward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {p.untyped_storage().data_ptr() for p in model.buffers()}
    inputs = {v.untyped_storage().data_ptr() for v in batch.values()}
    seen: dict[int, tuple] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            try:
                st = t.untyped_storage()
            except (RuntimeError, NotImplementedError):
                return t
            ptr = st.data_ptr()
            if ptr and ptr not in params and ptr not in inputs and ptr not in seen:
                seen[ptr] = (st.nbytes(), tuple(t.shape), str(t.dtype), type(t.grad_fn).__name__ if t.grad_fn else "",
                             [type(f[0]).__name__ for f in t.grad_fn.next_functions] if t.grad_fn else "")
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**batch)
    del out
    return sum(v[0] for v in seen.values()), list(seen.values())


def _reset_moe_metrics() -> None:
    try:
        from megatron.core.transformer.moe.moe_logging import destroy_moe_metrics_tracker
    except ImportError:
        return
    destroy_moe_metrics_tracker()


def count(case: dict) -> dict:
    """{'per_layer', 'outside', 'total_L'} counted for one case (L = case['layers'], default 1)."""
    from megatron.core import tensor_parallel

    from megafusion.model.transformer_config import build_transformer_config
    from megafusion.recipes import get_provider

    layers = case.get("layers", 1)
    totals, details = {}, {}
    for n in (layers, layers + 1):
        _reset_moe_metrics()  # megatron sizes its global MoE loss tracker by the first model's layers
        cfg = config(case, n)
        tc = build_transformer_config(cfg, torch.device("cpu"))
        provider = get_provider(cfg, tc)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        torch.manual_seed(0)
        stage = case.get("stage", "only")  # only | first | last: which pipeline stage's model is built
        model = provider.build(pre_process=stage in ("only", "first"), post_process=stage in ("only", "last"),
                               vp_stage=None)
        dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        model = model.to(dtype)  # what megatron's Float16Module does to the parameters under bf16
        model.train()
        batch = hand_batch(cfg.train.micro_batch_size, cfg.model.seq_length, case["image"], provider.latent_dim)
        batch["latents"] = batch["latents"].to(dtype)
        if stage == "last":  # the hidden states the previous stage sends ([s/tp, b, h] under SP)
            s, b, h = cfg.model.seq_length, cfg.train.micro_batch_size, cfg.model.hidden_size
            local = s // cfg.parallel.tp if cfg.parallel.sp else s
            model.set_input_tensor(torch.randn(local, b, h, dtype=dtype, requires_grad=True))
        totals[n], detail = saved_bytes(model, batch)
        details[n] = detail
    if os.environ.get("SAVED_BYTES_DEBUG"):
        from collections import Counter
        diff = Counter(repr(r) for r in details[layers + 1]) - Counter(repr(r) for r in details[layers])
        for row, k in sorted(diff.items()):
            print(k, row, file=sys.stderr)
    per_layer = totals[layers + 1] - totals[layers]
    return {"per_layer": per_layer, "outside": totals[layers] - layers * per_layer, "total": totals[layers]}


if __name__ == "__main__":  # torchrun worker: python -m torch.distributed.run --nproc_per_node 2 THIS cases.json
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megafusion.parallel import cpu_compat

    torch.set_num_threads(1)
    cases = json.loads(open(sys.argv[1]).read())
    with cpu_compat.applied("cpu"):
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        for case in cases:
            tp, ep = int(case["set"].get("parallel.tp", 1)), int(case["set"].get("parallel.ep", 1))
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, expert_model_parallel_size=ep)
            result = count(case)
            if rank == 0:
                print("COUNT " + json.dumps({"case": case, **result}), flush=True)
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()
        print(f"rank {rank} WORKER OK", flush=True)
