"""Helpers of benchmarks/gpu_check.sh (standard library only at import; torch where a table needs it).

    python3 benchmarks/gpu_check_report.py device                  # '<device-slug>' (cpu without a GPU)
    python3 benchmarks/gpu_check_report.py junit-json XML OUT.json  # pytest's junit XML -> JSON summary
    python3 benchmarks/gpu_check_report.py summary RESULTS_DIR [--quick] [--dry]
        # RESULTS_DIR/steps.tsv (one line per step: name, status, seconds, reason) -> summary.json,
        # and the README tables of the result JSONs there -> tables.md (also printed)
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def device_slug() -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'; 'cpu' without a CUDA GPU."""
    try:
        import torch

        name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    except Exception:  # no torch at all
        name = "cpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def junit_to_json(xml_path: str, out_path: str) -> dict:
    """Counts and one record per test (id, outcome, seconds, message) of a junit XML file."""
    tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    if Path(xml_path).exists():
        for case in ET.parse(xml_path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                node = case.find(tag)
                if node is not None:
                    outcome = "failed" if tag == "failure" else tag
                    message = (node.get("message") or node.text or "")[:2000]
                    break
            counts[outcome] += 1
            cid = f"{case.get('classname', '')}::{case.get('name', '')}"
            tests.append({"id": cid, "outcome": outcome, "seconds": float(case.get("time") or 0), "message": message})
    result = {"counts": counts, "tests": tests}
    Path(out_path).write_text(json.dumps(result, indent=1) + "\n")
    return result


def read_steps(results: Path) -> list[dict]:
    steps = []
    path = results / "steps.tsv"
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                name, status, seconds, reason = (line.split("\t") + ["", "", ""])[:4]
                steps.append({"step": name, "status": status, "seconds": float(seconds or 0), "reason": reason})
    return steps


def _versions() -> dict:
    found = {}
    for mod in ("torch", "triton", "megatron.core", "transformer_engine", "pytest", "pytest_benchmark"):
        try:
            found[mod] = str(__import__(mod, fromlist=["__version__"]).__version__)
        except Exception:
            found[mod] = None
    return found


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None
    except Exception:
        return None


def _load(path: Path) -> dict | None:
    """A result JSON, or None when absent, empty (pytest-benchmark writes 0 bytes when no case
    ran) or cut off."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def tables(results: Path) -> str:
    """The README tables of whatever result JSONs are in ``results`` (missing or empty ones
    are left out)."""
    sys.path.insert(0, str(HERE))
    parts = []
    data = _load(results / "gpu_tests.json")
    if data:
        c = data["counts"]
        parts.append(f"### GPU tests (`pytest -m gpu`)\n\n{c['passed']} passed, {c['failed']} failed, "
                     f"{c['error']} errors, {c['skipped']} skipped\n")
        rows = [t for t in data["tests"] if t["outcome"] in ("failed", "error")]
        if rows:
            parts.append("| test | outcome | reason |\n|---|---|---|\n" + "\n".join(
                f"| {t['id']} | {t['outcome']} | {' '.join(t['message'].split())[:160]} |" for t in rows) + "\n")
        skipped: dict[str, int] = {}
        for t in data["tests"]:
            if t["outcome"] == "skipped":
                why = " ".join(t["message"].split())[:160]
                skipped[why] = skipped.get(why, 0) + 1
        if skipped:
            parts.append("Skipped: " + "; ".join(f"{why} ({n})" for why, n in skipped.items()) + "\n")
    path = results / "hybrid_attention.json"
    if (_load(path) or {}).get("benchmarks"):
        import bench_hybrid_attention

        parts.append("### Hybrid attention (fwd+bwd = 3.5x forward FLOPs)\n\n" + bench_hybrid_attention.table(str(path)) + "\n")
    path = results / "moe_dispatch.json"
    if (_load(path) or {}).get("benchmarks"):
        import bench_moe_dispatch

        parts.append("### MoE permute + unpermute\n\n" + bench_moe_dispatch.table(
            str(path), ("GB_per_s", "fraction_of_copy_bw", "copy_GB_per_s"), baseline="megatron") + "\n")
    path = results / "grouped_mlp.json"
    if (_load(path) or {}).get("benchmarks"):
        import bench_moe_dispatch

        parts.append("### Grouped expert MLP\n\n" + bench_moe_dispatch.table(
            str(path), ("TFLOP_per_s", "fraction_of_peak"), baseline="loop") + "\n")
    train = {p.stem.removeprefix("train_"): _load(p) for p in sorted(results.glob("train_*.json"))}
    train = {name: result for name, result in train.items() if result}
    if train:
        from megafusion.bench import markdown_table

        parts.append("### Training throughput (`megafusion bench`; a step = 3x forward FLOPs)\n\n"
                     + markdown_table(train) + "\n")
    return "\n".join(parts)


def summary(results: Path, quick: bool, dry: bool) -> int:
    steps = read_steps(results)
    text = tables(results)
    record = {
        "device": device_slug(), "quick": quick, "dry_run": dry, "git_commit": _git_commit(),
        "versions": {} if dry else _versions(),
        "steps": steps, "total_seconds": sum(s["seconds"] for s in steps),
        "ok": all(s["status"] in ("ok", "skipped", "checked") for s in steps),
        "files": sorted(p.name for p in results.iterdir() if p.suffix in (".json", ".md")),
    }
    (results / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    lines = ["| step | status | seconds | reason |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']:.0f} | {s['reason']} |" for s in steps]
    report = "## GPU check: " + record["device"] + ("  (--quick)" if quick else "") + "\n\n" + "\n".join(lines) + "\n\n" + text
    (results / "tables.md").write_text(report)
    print(report, flush=True)
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["device"]:
        print(device_slug())
        return 0
    if argv[:1] == ["junit-json"] and len(argv) == 3:
        c = junit_to_json(argv[1], argv[2])["counts"]
        print(f"gpu tests: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")
        return 0
    if argv[:1] == ["summary"] and len(argv) >= 2:
        return summary(Path(argv[1]), "--quick" in argv, "--dry" in argv)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main(sys.argv[1:]))
