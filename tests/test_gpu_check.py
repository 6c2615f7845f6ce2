"""benchmarks/gpu_check.sh (issue 30): its CPU dry run, the gpu marker that `pytest -m gpu`
selects by, and the report it writes (summary.json, tables.md) from result files."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check_report  # noqa: E402


@pytest.mark.skipif(os.environ.get("GPU_CHECK_DRY_DONE") == "1", reason="ci/test.sh ran the dry run already")
def test_dry_run_passes_on_cpu(tmp_path):
    """Every command of the --quick selection parses, every file it reads exists; nothing is
    written into the tree."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_RESULTS": str(tmp_path / "dry"), "PYTHON": sys.executable}
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--quick"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "every command parses, every file exists" in out.stdout
    summary = json.loads((tmp_path / "dry" / "summary.json").read_text())
    assert summary["dry_run"] and summary["ok"] and summary["quick"]
    steps = [s["step"] for s in summary["steps"]]
    for prefix in ("syntax", "files read exist", "1 gpu_tests", "2 kernels", "3 train", "4 report"):
        assert any(s.startswith(prefix) for s in steps), (prefix, steps)


def test_unknown_option_is_refused():
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--fast"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 2 and "--quick" in out.stderr


def test_gpu_marker_selects_tests_skipped_for_want_of_a_gpu():
    """tests/conftest.py marks gpu every test skipped with a reason that names a GPU / CUDA /
    Transformer Engine, so `-m gpu` finds them without a marker on each."""
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          "-m", "gpu", "tests/kernels/test_moe_dispatch.py"], cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:]
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert "tests/kernels/test_moe_dispatch.py::test_grouped_mlp_torch_grouped_mm_matches_loop_on_gpu" in ids
    assert not any("gradcheck" in i for i in ids) and len(ids) >= 3, ids


def test_report_from_results(tmp_path):
    (tmp_path / "steps.tsv").write_text("1 gpu_tests\tok\t40\t\n2 kernels: moe_dispatch\ttimeout\t45\tstopped\n"
                                        "3 train\tskipped\t0\tmegatron.core is not importable\n")
    (tmp_path / "gpu_tests.xml").write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.kernels.test_x" name="test_a" time="1.5"/>'
        '<testcase classname="tests.kernels.test_x" name="test_b" time="0.1"><failure message="boom">tb</failure></testcase>'
        '<testcase classname="tests.training.test_fp8" name="test_c" time="0"><skipped message="needs TE"/></testcase>'
        '</testsuite></testsuites>')
    counts = gpu_check_report.junit_to_json(str(tmp_path / "gpu_tests.xml"), str(tmp_path / "gpu_tests.json"))["counts"]
    assert counts == {"passed": 1, "failed": 1, "error": 0, "skipped": 1}
    case = "T4096-H1024-E64k8-{}-fwd"
    (tmp_path / "moe_dispatch.json").write_text(json.dumps({"benchmarks": [
        {"param": case.format(impl), "stats": {"median": median},
         "extra_info": {"GB_per_s": 100 / median, "fraction_of_copy_bw": 0.1 / median, "copy_GB_per_s": 3000.0}}
        for impl, median in (("triton", 1e-3), ("megatron", 4e-3))]}))
    (tmp_path / "hybrid_attention.json").write_text(json.dumps({"benchmarks": [
        {"params": {"n": 8192, "pack": pack, "impl": impl, "pas": "fwd_bwd"}, "stats": {"median": 1e-3},
         "extra_info": {"tflops": tf, "gpu": "NVIDIA H100 80GB HBM3"}}
        for pack, impl, tf in (("mixed", "triton", 400.0), ("mixed", "flex", 320.0), ("text", "sdpa_causal", 450.0))]}))
    (tmp_path / "grouped_mlp.json").write_text("")  # pytest-benchmark's file when no case ran
    (tmp_path / "train_dense_bf16_triton.json").write_text('{"cut')  # a run killed mid-write
    assert gpu_check_report.summary(tmp_path, quick=True, dry=True) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert not summary["ok"]  # a step hit its time box
    assert summary["total_seconds"] == 85
    tables = (tmp_path / "tables.md").read_text()
    assert "1 passed, 1 failed, 0 errors, 1 skipped" in tables and "tests.kernels.test_x::test_b | failed | boom" in tables
    assert "Skipped: needs TE (1)" in tables and "Grouped" not in tables and "Training" not in tables
    assert "| T4096-H1024-E64k8-triton-fwd | 1.000 | 1e+05 | 100 | 3e+03 | 4.00 |" in tables
    assert "| fwd_bwd | 8192 | mixed | 400 | 320 | nan | 450 | 1.25x | 0.89x |" in tables
