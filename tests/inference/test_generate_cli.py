"""`megafusion generate` / `megafusion eval` refuse sampling options that cannot mean
anything, before loading a run: one line naming the value and what to give, exit 2.

Before, `--steps 0` loaded the run and then ended in the sampler's traceback, `--cfg nan`
sampled NaN latents, a negative `--temperature` decoded greedily without a word, and
`--top-k 0` silently meant "keep every token". No trained run is needed: the arguments
are checked first.
"""

import subprocess
import sys

import pytest

from conftest import REPO

BAD_SAMPLING = [
    (["--steps", "0"], "argument --steps: 0 is out of range; give an integer >= 1"),
    (["--steps", "-2"], "argument --steps: -2 is out of range; give an integer >= 1"),
    (["--cfg", "nan"], "argument --cfg: nan is not a finite number; give a finite guidance scale (1 = off)"),
    (["--cfg", "inf"], "argument --cfg: inf is not a finite number"),
    (["--shift", "inf"], "argument --shift: inf is not a finite number; give a time shift > 0"),
    (["--frame-shift", "0"], "argument --frame-shift: 0 is out of range; give a time shift > 0"),
]


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err  # one line, no usage block
    return err


@pytest.mark.parametrize("args, message", BAD_SAMPLING + [
    (["--temperature", "-0.5"], "argument --temperature: -0.5 is out of range; give a temperature >= 0 (0 = greedy)"),
    (["--temperature", "nan"], "argument --temperature: nan is not a finite number"),
    (["--top-k", "0", "--temperature", "1"], "argument --top-k: 0 is out of range; give an integer >= 1 (leave "
                                             "--top-k out to keep every token)"),
    (["--top-k", "-3", "--temperature", "1"], "argument --top-k: -3 is out of range"),
    (["--top-k", "5"], "argument --top-k: 5 has no effect with --temperature 0 (greedy decoding)"),
    (["--max-new-tokens", "0"], "argument --max-new-tokens: 0 is out of range; give an integer >= 1"),
    (["--rollout", "-1"], "argument --rollout: -1 is out of range; give a held-out video index >= 0"),
    (["--steps", "two"], "argument --steps: 'two' is not an integer; give an integer >= 1"),
    (["--rollout", "0", "--actions", " , "], "argument --actions: ' , ' names no action; give e.g. up,left,stay"),
    (["--rollout", "0", "--actions", "up,jump"], "argument --actions: unknown action 'jump'"),
    (["--actions", "up"], "argument --actions: only --rollout reads it"),
])
def test_generate_refuses_bad_sampling_options(tmp_path, capsys, args, message):
    from megafusion.inference.cli import main

    # the run dir does not exist: the arguments are refused before anything is loaded
    err = _refused(main, ["--run-dir", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o"), *args],
                   capsys)
    assert err.startswith("megafusion generate: error: ") and message in err


@pytest.mark.parametrize("args, message", BAD_SAMPLING + [
    (["--planning-candidates", "1"], "argument --planning-candidates: 1 is out of range; give an integer >= 2"),
    (["--planning-n", "0"], "argument --planning-n: 0 is out of range; give an integer >= 1"),
])
def test_eval_refuses_the_same_sampling_options(tmp_path, capsys, args, message):
    from megafusion.eval.cli import main

    err = _refused(main, ["--run-dir", str(tmp_path / "none"), *args], capsys)
    assert err.startswith("megafusion eval: error: ") and message in err


def test_valid_sampling_options_parse():
    from megafusion.inference.cli import build_parser

    args = build_parser().parse_args(["--run-dir", "r", "--out", "o", "--steps", "1", "--cfg", "0", "--temperature",
                                      "0.7", "--top-k", "1", "--shift", "100", "--rollout", "0"])
    assert (args.steps, args.cfg, args.temperature, args.top_k, args.shift, args.rollout) == (1, 0.0, 0.7, 1, 100.0, 0)
    assert build_parser().parse_args(["--run-dir", "r", "--out", "o"]).top_k is None  # no cut unless asked


def test_megafusion_generate_steps_0_exits_2_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", "generate", "--run-dir", str(tmp_path),
                           "--prompt", "x", "--out", str(tmp_path / "o"), "--steps", "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["megafusion generate: error: argument --steps: 0 is out of range; give an "
                                        "integer >= 1 (ODE steps per image or frame) (see megafusion generate --help)"]
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- wrong paths and values
# `megafusion generate` / `megafusion eval` answer a wrong path, a wrong kind of directory or an
# impossible value with one line naming it and what was expected, exit 2, no traceback.


def _one_line(capsys, prog: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"megafusion {prog}: "), err
    return err


def _generate(tmp_path, *args):
    from megafusion.inference.cli import main

    return main(["--prompt", "x", "--out", str(tmp_path / "gen"), *args])


def _eval(*args):
    from megafusion.eval.cli import main

    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's refusals
        return exit_.code


@pytest.mark.parametrize("prog", ["generate", "eval"])
def test_a_file_or_a_missing_path_as_run_dir(tmp_path, capsys, prog):
    afile = tmp_path / "config.yaml"
    afile.write_text("model: {}\n")
    for path, expected in ((afile, "is a file, not a directory"), (tmp_path / "nowhere", "does not exist")):
        rc = _generate(tmp_path, "--run-dir", str(path)) if prog == "generate" else _eval("--run-dir", str(path))
        assert rc == 2
        err = _one_line(capsys, prog)
        assert f"--run-dir {path}: {expected}" in err and "config.yaml + checkpoints/" in err


@pytest.mark.parametrize("prog", ["generate", "eval"])
def test_a_directory_without_config_yaml(tmp_path, capsys, prog):
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = (_generate(tmp_path, "--run-dir", str(empty)) if prog == "generate" else
          _eval("--run-dir", str(empty), "--out", str(tmp_path / "e")))
    assert rc == 2
    assert "config.yaml' does not exist" in _one_line(capsys, prog)


def test_generate_refuses_a_missing_caption_image_an_output_file_and_cuda_without_gpu(tmp_path, capsys):
    import torch

    run = tmp_path / "run"
    run.mkdir()
    assert _generate(tmp_path, "--run-dir", str(run), "--caption", str(tmp_path / "no.png")) == 2
    assert "--caption" in _one_line(capsys, "generate") and "does not exist; give a PNG image file"
    (tmp_path / "not.png").write_text("text")
    assert _generate(tmp_path, "--run-dir", str(run), "--caption", str(tmp_path / "not.png")) == 2
    assert "cannot be read as an image" in _one_line(capsys, "generate")
    (tmp_path / "gen").write_text("a file where the output directory goes")
    assert _generate(tmp_path, "--run-dir", str(run)) == 2
    assert f"--out {tmp_path / 'gen'}: {tmp_path / 'gen'} is a file" in _one_line(capsys, "generate")
    if not torch.cuda.is_available():
        (tmp_path / "gen").unlink()
        assert _generate(tmp_path, "--run-dir", str(run), "--device", "cuda") == 2
        assert "--device cuda: no CUDA GPU is visible" in _one_line(capsys, "generate")


def test_eval_refuses_a_missing_world_a_bad_only_and_a_bad_device(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    assert _eval("--run-dir", str(run), "--world", str(tmp_path / "manifest.json")) == 2
    assert f"--world {tmp_path / 'manifest.json'}: does not exist" in _one_line(capsys, "eval")
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert _eval("--run-dir", str(run), "--world", str(tmp_path / "bad.json")) == 2
    assert "not a ShapesWorld manifest" in _one_line(capsys, "eval")
    assert _eval("--run-dir", str(run), "--only", "vqa,worldmodel") == 2
    assert "--only vqa,worldmodel: choose from generation" in _one_line(capsys, "eval")
    assert _eval("--run-dir", str(run), "--device", "gpu") == 2
    assert "argument --device: invalid choice: 'gpu'" in _one_line(capsys, "eval")


@pytest.fixture(scope="module")
def text_run_and_export(tmp_path_factory):
    """A one-step text run and its export: the wrong kind of model for generate/eval."""
    from conftest import run_train

    root = tmp_path_factory.mktemp("text_export")
    run_train(root / "run", "tiny_text.yaml", ["train.steps=1", "schedule.warmup_steps=0", "logging.tensorboard=false"])
    proc = subprocess.run([sys.executable, "-m", "megafusion.cli", "export", "--run-dir", str(root / "run"),
                           "--out", str(root / "export")], capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "run", root / "export"


@pytest.mark.parametrize("prog", ["generate", "eval"])
@pytest.mark.parametrize("which", ["run", "export"])
def test_a_text_model_is_refused_by_name(tmp_path, capsys, text_run_and_export, prog, which):
    path = text_run_and_export[0 if which == "run" else 1]
    rc = (_generate(tmp_path, "--run-dir", str(path)) if prog == "generate" else
          _eval("--run-dir", str(path), "--out", str(tmp_path / "e")))
    assert rc == 2
    err = _one_line(capsys, prog)
    assert "model.kind = 'text'" in err and "need a Transfusion model" in err

