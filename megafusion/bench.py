"""``megafusion bench``: training throughput of a config - tokens/s, TFLOP/s per GPU, MFU,
peak memory and where the step time goes.

    megafusion bench examples/configs/bench_transfusion_1b.yaml --steps 20 --warmup 5 --out bench.json
    torchrun --nproc_per_node 8 -m megafusion.bench CONFIG --set parallel.tp=2 --steps 20 --out bench.json

It runs the real trainer (``megafusion.training.loop.train``) in a temporary run directory
with checkpoints and TensorBoard off, for ``warmup`` + ``steps`` timed steps, then
``1 + profile_steps`` more under ``torch.profiler`` (the first one warms the profiler up):

- throughput over the ``steps`` timed steps (no profiler running): tokens/s (global batch
  tokens / step time), model TFLOP/s per GPU from ``megafusion.scaling.flops`` (the loop's
  ``tflops_per_gpu``: attention counted on the pairs the hybrid mask lets through) and
  MFU against the GPU's documented dense peak for the matmul dtype (``flops.matmul_dtype``:
  fp8 with ``train.fp8``, else ``train.precision``; null for a CPU or a GPU not in the table);
- peak memory: CUDA max allocated on a GPU, the process's peak RSS on a CPU;
- the split of the profiled steps' time into the named ranges ``megafusion.attention``,
  ``megafusion.moe_dispatch``, ``megafusion.data`` and the rest. Attention and MoE dispatch
  count their forward range *and* the backward of the ops run inside it (matched by the
  autograd sequence numbers the profiler records), in device time on CUDA (CPU time on a
  CPU). Data is host work that blocks the step, so it counts host time everywhere.

Rank 0 prints the table and writes the JSON; every figure is rank 0's (its GPU, its share).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from megafusion.config import Config, ConfigError, load_config, validate

RANGES = ("megafusion.attention", "megafusion.moe_dispatch", "megafusion.data")
# ranges whose backward belongs to them (data has none)
_WITH_BACKWARD = ("megafusion.attention", "megafusion.moe_dispatch")
_BACKWARD_PREFIX = "autograd::engine::evaluate_function:"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megafusion bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config file (see examples/configs/bench_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set model.attention=flex (repeatable)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, caches; default 3)")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="steps run under torch.profiler after the timed ones for the time split "
                             "(default 3; 0 = no split)")
    parser.add_argument("--out", default=None, help="write the results as JSON here (rank 0)")
    parser.add_argument("--trace", default=None, help="also write the profiler's Chrome trace to this file (rank 0)")
    parser.add_argument("--run-dir", default=None,
                        help="run directory for the trainer (default: a temporary one, removed afterwards)")
    parser.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                        help="instead of running: print a Markdown table of these results files")
    return parser


# --------------------------------------------------------------------------- configuration


def bench_config(cfg: Config, total_steps: int) -> Config:
    """The config as benchmarked: ``total_steps`` steps, logging every step to metrics.jsonl,
    no checkpoints, no TensorBoard. The LR schedule is kept (stretched if its warmup would
    not fit, which validation refuses)."""
    cfg.train.steps = total_steps
    cfg.checkpoint.every = 0
    cfg.checkpoint.save_final = False
    cfg.logging.every = 1
    cfg.logging.tensorboard = False
    if cfg.schedule.warmup_steps >= (cfg.schedule.decay_steps or total_steps):
        cfg.schedule.decay_steps = cfg.schedule.warmup_steps + total_steps
    return cfg


# --------------------------------------------------------------------------- profile analysis


def _walk(event):
    for child in event.cpu_children:
        yield child
        yield from _walk(child)


def _has_ancestor_in(event, chosen: set[int]) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if id(parent) in chosen:
            return True
        parent = parent.cpu_parent
    return False


def _top_level(events: list) -> list:
    """The events of ``events`` that are not nested inside another one of them."""
    chosen = {id(e) for e in events}
    return [e for e in events if not _has_ancestor_in(e, chosen)]


def range_times(events, device: bool) -> dict[str, float]:
    """Seconds spent in each of :data:`RANGES` over the profiled steps.

    ``events``: the profiler's ``events()`` (a FunctionEvent list with its tree built).
    ``device``: count device (kernel) time, else CPU time. The ``megafusion.data`` range
    counts CPU time in either case. Attention and MoE dispatch add the backward of every op
    run inside their forward range: autograd's ``evaluate_function`` events whose sequence
    number and forward thread match such an op.
    """
    cpu_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU]
    out: dict[str, float] = {}
    for name in RANGES:
        forward = _top_level([e for e in cpu_events if e.name == name])
        selected = list(forward)
        if name in _WITH_BACKWARD:
            keys = {(c.sequence_nr, c.thread) for e in forward for c in _walk(e) if c.sequence_nr >= 0}
            selected += [e for e in cpu_events if e.name.startswith(_BACKWARD_PREFIX)
                         and (e.sequence_nr, e.fwd_thread) in keys]
        use_device = device and name != "megafusion.data"
        total_us = sum(e.device_time_total if use_device else e.cpu_time_total for e in _top_level(selected))
        out[name] = total_us / 1e6
    return out


def ranges_seen(events) -> list[str]:
    names = {e.name for e in events}
    return [name for name in RANGES if name in names]


# --------------------------------------------------------------------------- measurements


def _device(cfg: Config) -> torch.device:
    from megafusion.parallel.setup import resolve_device

    return resolve_device(cfg.train.device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def peak_memory(device: torch.device) -> tuple[int, str]:
    """(bytes, what was measured)."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    # ru_maxrss is in KiB on Linux
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "cpu_peak_rss"


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for package in ("megatron-core", "transformer-engine", "triton"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def summarize(records: list[dict], cfg: Config, device_type: str, name: str, memory: tuple[int, str],
              warmup: int, steps: int, profile_steps: int, split_times: dict[str, float] | None,
              seen: list[str], world_size: int = 1) -> dict[str, Any]:
    """The figures of the results JSON from the trainer's per-step metrics.

    ``records``: metrics.jsonl of the run (one per step). Timed steps are
    ``warmup + 1 .. warmup + steps``; the profiled ones are the last ``profile_steps``.
    ``device_type`` / ``name``: "cuda" and ``torch.cuda.get_device_name()``, or "cpu" (no MFU).
    ``memory``: (bytes, kind) from :func:`peak_memory`. ``split_times``: :func:`range_times`.
    """
    from megafusion.scaling.flops import matmul_dtype
    from megafusion.scaling.flops import mfu as mfu_of

    by_step = {r["step"]: r for r in records}
    timed = [by_step[s] for s in range(warmup + 1, warmup + steps + 1)]
    step_times = [r["step_time_s"] for r in timed]
    total_time = sum(step_times)
    tokens_per_step = cfg.train.global_batch_size * cfg.model.seq_length
    flops_per_gpu = sum(r["tflops_per_gpu"] * 1e12 * r["step_time_s"] for r in timed)
    tflops_per_gpu = flops_per_gpu / total_time / 1e12
    # MFU against the peak of the dtype the matmuls run in (FP8 with a recipe on); an FP8 run
    # also reports the figure against the train.precision peak, to compare with bf16 runs.
    peak_dtype = matmul_dtype(cfg.train.precision, cfg.train.fp8)
    mfu = mfu_vs_precision = None
    if device_type == "cuda":
        mfu = mfu_of(tflops_per_gpu * 1e12, name, peak_dtype)
        if peak_dtype != cfg.train.precision:
            mfu_vs_precision = mfu_of(tflops_per_gpu * 1e12, name, cfg.train.precision)
    memory_bytes, memory_kind = memory

    split = split_s = None
    if split_times is not None and profile_steps:
        profiled = [by_step[s] for s in range(warmup + steps + 2, warmup + steps + 2 + profile_steps)]
        profiled_time = sum(r["step_time_s"] for r in profiled)
        is_moe = cfg.model.moe.num_experts > 0
        parts = {
            "attention": split_times["megafusion.attention"],
            # a MoE model without the range: not measured (null), not zero
            "moe_dispatch": (split_times["megafusion.moe_dispatch"]
                             if "megafusion.moe_dispatch" in seen or not is_moe else None),
            "data": split_times["megafusion.data"],
        }
        known = sum(v for v in parts.values() if v is not None)
        parts["other"] = max(profiled_time - known, 0.0)
        split = {k: (None if v is None else v / profiled_time) for k, v in parts.items()}
        split_s = {k: (None if v is None else v / profile_steps) for k, v in parts.items()}

    return {
        "device": name,
        "device_type": device_type,
        "world_size": world_size,
        "warmup_steps": warmup,
        "steps": steps,
        "profile_steps": profile_steps,
        "tokens_per_step": tokens_per_step,
        "step_time_s": total_time / steps,
        "step_times_s": step_times,
        "data_time_s": sum(r.get("data_time_s", 0.0) for r in timed) / steps,
        "tokens_per_s": tokens_per_step * steps / total_time,
        "tokens_per_s_per_gpu": tokens_per_step * steps / total_time / world_size,
        "tflops_per_gpu": tflops_per_gpu,
        "mfu": mfu,
        "mfu_peak_dtype": peak_dtype,
        "mfu_vs_precision_peak": mfu_vs_precision,
        "peak_memory_bytes": memory_bytes,
        "peak_memory_kind": memory_kind,
        "time_split": split,
        "time_split_s_per_step": split_s,
        "time_split_basis": {"attention": "device" if device_type == "cuda" else "cpu",
                             "moe_dispatch": "device" if device_type == "cuda" else "cpu", "data": "host"},
        "ranges_seen": seen,
        "final_loss": timed[-1].get("loss") if timed else None,
    }


def format_table(result: dict[str, Any]) -> str:
    from megafusion.scaling.flops import format_mfu

    gib = result["peak_memory_bytes"] / 2**30
    lines = [
        f"megafusion bench: {result['config_path']} on {result['device']}, {result['world_size']} process(es), "
        f"torch {result['versions']['torch']}",
        f"  {'timed steps':<18}{result['steps']} (after {result['warmup_steps']} warmup)",
        f"  {'step time':<18}{result['step_time_s']:.4g} s (data {result['data_time_s']:.3g} s)",
        f"  {'tokens/s':<18}{result['tokens_per_s']:,.0f} ({result['tokens_per_s_per_gpu']:,.0f} per "
        f"{'GPU' if result['device_type'] == 'cuda' else 'process'})",
        f"  {'TFLOP/s per GPU':<18}{result['tflops_per_gpu']:.4g}",
        f"  {'MFU':<18}" + (f"unknown (no documented {result['mfu_peak_dtype']} peak for this device)"
                            if result["mfu"] is None else
                            f"{format_mfu(result['mfu'])} of the dense {result['mfu_peak_dtype']} peak")
        + ("" if result["mfu_vs_precision_peak"] is None else
           f" ({format_mfu(result['mfu_vs_precision_peak'])} of the {result['config']['train']['precision']} peak)"),
        f"  {'peak memory':<18}{gib:.2f} GiB ({result['peak_memory_kind']})",
    ]
    split = result["time_split"]
    if split is not None:
        basis = "device" if result["device_type"] == "cuda" else "CPU"
        lines.append(f"  time split over {result['profile_steps']} profiled steps ({basis} time; data: host time):")
        for part, fraction in split.items():
            seconds = result["time_split_s_per_step"][part]
            shown = "not measured (no range)" if fraction is None else f"{100 * fraction:5.1f}%  {seconds:.4g} s/step"
            lines.append(f"    {part:<14}{shown}")
    return "\n".join(lines)


def markdown_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per results file (name -> results JSON): the README's throughput table."""
    from megafusion.scaling.flops import format_mfu

    def pct(split, key):
        value = (split or {}).get(key)
        return "-" if value is None else f"{100 * value:.0f}%"

    head = ("| run | GPU | spec | fp8 | attention | MoE dispatch | tokens/s | TFLOP/s/GPU | MFU | peak mem | "
            "attn | MoE disp. | data | other |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in results.items():
        m, t = r["config"]["model"], r["config"]["train"]
        moe = m["moe"]["dispatch"] if m["moe"]["num_experts"] else "-"
        split = r.get("time_split")
        lines.append(f"| {name} | {r['device']} | {m['spec']} | {t.get('fp8', 'none')} | {m['attention']} | {moe} | "
                     f"{r['tokens_per_s']:,.0f} | {r['tflops_per_gpu']:.3g} | {format_mfu(r['mfu'])} | "
                     f"{r['peak_memory_bytes'] / 2**30:.1f} GiB | {pct(split, 'attention')} | "
                     f"{pct(split, 'moe_dispatch')} | {pct(split, 'data')} | {pct(split, 'other')} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the command


def run(cfg: Config, run_dir: Path, warmup: int, steps: int, profile_steps: int,
        trace: str | None = None) -> tuple[dict[str, float] | None, list[str]]:
    """Trains ``cfg`` (already set up by :func:`bench_config`); returns the profiled range
    times (None without profiling) and the ranges the profile holds."""
    from torch.profiler import ProfilerActivity, profile, schedule

    from megafusion.training.loop import train

    device = _device(cfg)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if not profile_steps:
        train(cfg, run_dir)
        return None, []
    found: dict[str, Any] = {}
    is_main = os.environ.get("RANK", "0") == "0"

    def on_trace_ready(prof) -> None:
        if not is_main:
            return
        events = prof.events()
        found["times"] = range_times(events, device=device.type == "cuda")
        found["seen"] = ranges_seen(events)
        if trace:
            prof.export_chrome_trace(trace)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities, on_trace_ready=on_trace_ready,
                 schedule=schedule(wait=warmup + steps, warmup=1, active=profile_steps, repeat=1)) as prof:
        train(cfg, run_dir, profiler=prof)
    return found.get("times"), found.get("seen", [])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.summarize:
        print(markdown_table({Path(p).stem: json.loads(Path(p).read_text()) for p in args.summarize}))
        return 0
    if args.config is None:
        parser.error("a CONFIG file is needed (or --summarize JSON...)")
    is_main = os.environ.get("RANK", "0") == "0"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.steps < 1 or args.warmup < 0 or args.profile_steps < 0:
        print("megafusion bench: --steps must be >= 1, --warmup and --profile-steps >= 0", file=sys.stderr)
        return 2
    total = args.warmup + args.steps + (1 + args.profile_steps if args.profile_steps else 0)
    try:
        cfg = bench_config(load_config(args.config, args.overrides), total)
        validate(cfg, world_size)
    except ConfigError as err:
        if is_main:
            print(f"megafusion bench: {err}", file=sys.stderr)
        return 2

    temporary = args.run_dir is None
    run_dir = Path(tempfile.mkdtemp(prefix="megafusion-bench-")) if temporary else Path(args.run_dir)
    if not temporary and (run_dir / "metrics.jsonl").exists():
        print(f"megafusion bench: --run-dir {run_dir} already holds a run; give a new directory", file=sys.stderr)
        return 2
    from megafusion.training.guards import NON_FINITE_EXIT_CODE, NonFiniteError
    from megafusion.training.preemption import PREEMPTED_EXIT_CODE, Preempted

    from megafusion.logging_setup import configure_logging, megatron_warnings

    configure_logging()  # the training steps' progress lines (rank and time per record)
    try:
        try:
            from megafusion.parallel import cpu_compat

            # on CPU: megatron-core's compatibility layer; its warnings: one line (MEGAFUSION_SHOW_WARNINGS=1)
            with cpu_compat.applied(_device(cfg)), megatron_warnings():
                split_times, seen = run(cfg, run_dir, args.warmup, args.steps, args.profile_steps, args.trace)
        except NonFiniteError as err:
            print(f"megafusion bench: {err}", file=sys.stderr)
            return NON_FINITE_EXIT_CODE
        except Preempted as err:  # a benchmark cut short measures nothing: no result is written
            print(f"megafusion bench: {err.signal_name} before the measurement finished; no result written",
                  file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        if not is_main:
            return 0
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        device = _device(cfg)
        result = {
            "config_path": args.config,
            "overrides": args.overrides,
            "command": shlex.join(["megafusion", "bench", *argv]),
            "launcher": f"torchrun, {world_size} processes" if "RANK" in os.environ else "single process",
            "argv": sys.argv,
            "git_commit": _git_commit(),
            "versions": _versions(),
            **summarize(records, cfg, device.type, device_name(device), peak_memory(device), args.warmup,
                        args.steps, args.profile_steps, split_times, seen, world_size),
            "config": cfg.to_dict(),
        }
    finally:
        if temporary:
            shutil.rmtree(run_dir, ignore_errors=True)
    print(format_table(result), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"megafusion bench: wrote {args.out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
