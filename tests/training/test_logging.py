"""Console reporting: the rank in every record, megatron-core's warnings collapsed into one
line (never ours), a progress line with an ETA every ``logging.console_every`` steps while
``metrics.jsonl`` keeps every logged step."""

import json
import logging
import os
import subprocess
import sys
import warnings

import pytest

from conftest import CONFIGS, REPO


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    megatron_level = logging.getLogger("megatron").level
    yield
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    logging.getLogger("megatron").setLevel(megatron_level)


def test_records_carry_the_rank_and_go_to_stdout_or_stderr(capsys, restore_logging):
    from megafusion.logging_setup import configure_logging

    configure_logging(rank=3, level=logging.INFO)
    configure_logging(rank=3, level=logging.INFO)  # a second call replaces, never doubles, the handlers
    logging.getLogger("megafusion.x").info("hello")
    logging.getLogger("megafusion.x").warning("careful")
    out, err = capsys.readouterr()
    assert out.count("hello") == 1 and "[rank 0] hello" in out  # RANK unset, no process group: rank 0
    assert err.count("careful") == 1 and "[rank 0] WARNING megafusion.x: careful" in err


def test_other_ranks_log_warnings_only(capsys, restore_logging, monkeypatch):
    from megafusion.logging_setup import configure_logging

    monkeypatch.setenv("RANK", "2")
    configure_logging()
    logging.getLogger("megafusion.x").info("progress")
    logging.getLogger("megafusion.x").warning("trouble")
    out, err = capsys.readouterr()
    assert "progress" not in out and "[rank 2] WARNING megafusion.x: trouble" in err


def _fake_megatron_warning(tmp_path, text):
    """A warning raised from a file under a ``megatron`` folder, as megatron-core's are."""
    path = tmp_path / "megatron" / "core" / "fake.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"import warnings\ndef warn():\n    warnings.warn({text!r})\n")
    namespace = {"__name__": "megatron.core.fake"}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace["warn"]


def test_megatron_warnings_collapse_into_one_line_and_ours_still_show(tmp_path, capsys, restore_logging,
                                                                      monkeypatch):
    from megafusion.logging_setup import configure_logging, megatron_warnings

    monkeypatch.delenv("MEGAFUSION_SHOW_WARNINGS", raising=False)
    configure_logging(rank=0)
    warn = _fake_megatron_warning(tmp_path, "Transformer Engine and Apex are not installed. Falling back")
    with warnings.catch_warnings(record=True) as shown, megatron_warnings() as noise:
        warnings.simplefilter("always")
        warn()
        warn()
        logging.getLogger("megatron.core.models").warning("GPTModel IS DEPRECATED.")
        logging.getLogger("megatron.core.models").error("a real megatron error")
        warnings.warn("our own warning")  # raised from this file: shown at once, as before
        assert [str(w.message) for w in shown] == ["our own warning"]
        early = "".join(capsys.readouterr())
        assert "Transformer Engine" not in early and "GPTModel" not in early
        assert "ERROR megatron.core.models: a real megatron error" in early  # errors are never collapsed
        noise.summarize()
        noise.summarize()  # once only
    out, err = capsys.readouterr()
    assert len(noise) == 3
    lines = [line for line in out.splitlines() if "megatron-core:" in line]
    assert len(lines) == 1, out
    assert "3 warnings (2 distinct)" in lines[0] and "Transformer Engine and Apex absent" in lines[0]
    assert "MEGAFUSION_SHOW_WARNINGS=1" in lines[0]


def test_show_warnings_turns_the_collapsing_off(tmp_path, capsys, restore_logging, monkeypatch):
    from megafusion.logging_setup import configure_logging, megatron_warnings

    monkeypatch.setenv("MEGAFUSION_SHOW_WARNINGS", "1")
    configure_logging(rank=0)
    warn = _fake_megatron_warning(tmp_path, "Apex is not installed. Falling back to Torch Norm")
    with megatron_warnings() as noise:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            warn()
    assert len(noise) == 0 and [str(w.message) for w in seen] == ["Apex is not installed. Falling back to Torch Norm"]
    assert "megatron-core:" not in capsys.readouterr().out


def test_progress_lines_every_console_every_with_eta_while_jsonl_keeps_every_step(tmp_path, caplog):
    from megafusion.training.metrics import MetricsWriter, format_duration

    assert [format_duration(s) for s in (4.6, 65, 7322)] == ["5s", "1m05s", "2h02m"]
    writer = MetricsWriter(tmp_path, True, False, total_steps=12, console_every=5)
    with caplog.at_level(logging.INFO, logger="megafusion.training.metrics"):
        for step in range(1, 13):
            writer.log(step, {"loss": 1.0 / step, "step_time_s": 0.01}, force_console=step == 7)
    writer.close()
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split("/")[0] for line in lines] == ["step  1", "step  5", "step  7", "step 10", "step 12"]
    assert all("eta " in line for line in lines[:-1]) and "eta" not in lines[-1]  # the last: nothing left
    assert "(100%)" in lines[-1] and "loss 0.08333" in lines[-1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))


def test_eta_is_the_pace_since_the_first_logged_step(tmp_path):
    from megafusion.training.metrics import MetricsWriter

    writer = MetricsWriter(tmp_path, False, False, total_steps=100, start_step=10)
    writer._first = (1000.0, 11)  # step 11 logged at t = 1000 s (start-up and its slow first step before)
    assert writer.eta_seconds(21, now=1020.0) == pytest.approx(2.0 * 79)  # 2 s a step, 79 steps left
    assert writer.eta_seconds(100, now=2000.0) is None


def test_console_every_must_be_a_multiple_of_every():
    from megafusion.config import ConfigError, load_config, validate

    validate(load_config(CONFIGS / "tiny_text.yaml", ["logging.every=5", "logging.console_every=50"]), 1)
    with pytest.raises(ConfigError, match=r"logging.console_every = 12 must be a multiple of logging.every = 5"):
        validate(load_config(CONFIGS / "tiny_text.yaml", ["logging.every=5", "logging.console_every=12"]), 1)
    with pytest.raises(ConfigError, match=r"logging.console_every = 0 must be >= 1"):
        validate(load_config(CONFIGS / "tiny_text.yaml", ["logging.console_every=0"]), 1)


def test_train_prints_a_screen_not_a_page(tmp_path):
    """A real run: one collapsed megatron line, progress every console_every steps with the rank,
    no megatron warning text, and every step in metrics.jsonl."""
    proc = subprocess.run([sys.executable, "-m", "megafusion.train", "--config", str(CONFIGS / "tiny_text.yaml"),
                           "--run-dir", str(tmp_path / "run"), "--set", "train.steps=5", "--set",
                           "logging.console_every=2", "--set", "logging.tensorboard=false", "--set",
                           "checkpoint.save_final=false"],
                          cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={k: v for k, v in os.environ.items() if k != "MEGAFUSION_SHOW_WARNINGS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert out.count("megatron-core:") == 1 and "set MEGAFUSION_SHOW_WARNINGS=1" in out
    steps = [line.split("step ")[1].split("/")[0] for line in out.splitlines() if "] step " in line]
    assert steps == ["1", "2", "4", "5"], out
    assert all("[rank 0]" in line for line in out.splitlines() if line.strip())
    noise = ("Transformer Engine and Apex", "Apex is not installed", "deprecated", "DEPRECATED", "experimental")
    others = "\n".join(line for line in out.splitlines() if "megatron-core:" not in line) + proc.stderr
    assert not any(word in others for word in noise), others
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
