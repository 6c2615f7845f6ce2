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
