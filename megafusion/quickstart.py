"""``megafusion quickstart``: the whole pipeline on ShapesWorld, on a CPU, in minutes.

    megafusion quickstart --out runs/quickstart          # ~10 min on 2 CPU cores
    megafusion quickstart --out runs/qs --quick          # a smoke version (CI)
    megafusion quickstart --out runs/qs --full           # longer: shows the paper's trends

Stages (each prints its progress; artifacts land under ``--out``):

1. ``data/raw/``: a ShapesWorld dataset as files (text, image-caption pairs, videos,
   action-conditioned videos), in the formats the preprocessing tool reads.
2. ``data/tokenizer.model``: a sentencepiece tokenizer with megafusion's special tokens.
3. ``data/indexed/``: indexed datasets made by the preprocessing tool (pixel latents).
4. ``run/``: a tiny Transfusion model trained on them with ``megafusion train``.
5. ``eval/``: the exact ShapesWorld evaluations of that model, then ``report.md`` with
   loss curves per modality, a sample grid and the evaluation table (each figure next to
   its chance level).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


@dataclass(frozen=True)
class Scale:
    """How big each stage is."""

    n_text: int
    n_image: int
    n_video: int
    n_action: int
    steps: int
    eval_n: int  # items per evaluation
    eval_ode_steps: int  # ODE steps per generated image / frame
    planning_candidates: int


SCALES = {
    "quick": Scale(n_text=60, n_image=60, n_video=6, n_action=6, steps=6, eval_n=4, eval_ode_steps=4,
                   planning_candidates=2),
    "default": Scale(n_text=2000, n_image=2000, n_video=200, n_action=200, steps=1500, eval_n=16,
                     eval_ode_steps=10, planning_candidates=4),
    "full": Scale(n_text=8000, n_image=8000, n_video=800, n_action=800, steps=8000, eval_n=128,
                  eval_ode_steps=25, planning_candidates=8),
}
IMAGE_SIZE, PATCH_SIZE = 32, 8
KINDS = {"text": "text", "image_text": "image-text", "video": "video", "action_video": "action-video"}


def _stage(number: int, title: str) -> float:
    print(f"\n[quickstart {number}/5] {title}", flush=True)
    return time.time()


def _done(started: float) -> None:
    print(f"[quickstart] ... done in {time.time() - started:.1f}s", flush=True)


def prepare_data(out: Path, scale: Scale, seed: int) -> tuple[Path, list[Path]]:
    """Stages 1-3: ShapesWorld files -> tokenizer -> indexed datasets. Returns (tokenizer, prefixes)."""
    from megafusion.data import preprocess
    from megafusion.data.shapes import ACTIONS
    from megafusion.data.shapes.export import write_dataset
    from megafusion.data.tokenizer import train_tokenizer

    started = _stage(1, f"ShapesWorld data -> {out / 'data/raw'}")
    raw = write_dataset(out / "data" / "raw", seed=seed, n_text=scale.n_text, n_image=scale.n_image,
                        n_video=scale.n_video, n_action=scale.n_action, image_size=IMAGE_SIZE)
    _done(started)

    started = _stage(2, "sentencepiece tokenizer")
    corpus = out / "data" / "tokenizer_corpus.txt"
    lines = []
    for kind in ("text", "image_text", "video", "action_video"):
        lines += [json.loads(line)["text"] for line in raw[kind].read_text().splitlines() if line.strip()]
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer([corpus], out / "data" / "tokenizer", vocab_size=512, actions=list(ACTIONS),
                                extra_options={"hard_vocab_limit": False})
    _done(started)

    started = _stage(3, "preprocess to indexed datasets (tools/preprocess_data.py)")
    prefixes = []
    for key, kind in KINDS.items():
        prefix = out / "data" / "indexed" / key
        args = ["--input", str(raw[key]), "--output-prefix", str(prefix), "--kind", kind,
                "--tokenizer-model", str(tokenizer), "--image-size", str(IMAGE_SIZE),
                "--patch-size", str(PATCH_SIZE), "--append-eod", "--context-frames", "1", "--no-progress"]
        if kind == "image-text":
            args += ["--image-first", "0.2"]  # some images come first: captioning data
        if preprocess.main(args) != 0:
            raise RuntimeError(f"preprocessing {raw[key]} failed; see the message above")
        prefixes.append(Path(f"{prefix}_text_document") if kind == "text" else prefix)
    _done(started)
    return tokenizer, prefixes


def train_overrides(tokenizer: Path, prefixes: list[Path], steps: int, device: str) -> list[str]:
    from megafusion.data.tokenizer import Tokenizer

    paths = ", ".join(str(p) for p in prefixes)
    vocab = -(-Tokenizer(tokenizer).vocab_size // 64) * 64  # padded: divisible by any small TP
    return [
        f"model.vocab_size={vocab}",
        "data.kind=indexed",
        f"data.paths=[{paths}]",
        # Image-caption pairs weigh most; shift the noise schedule towards noise: the 'auto'
        # shift of 16 x 192 pixel latents is below 1 and made denoising too easy (planning
        # success 0.25 -> 0.56, chance 0.28, in one 1500-step comparison).
        "data.weights=[0.5, 2.0, 0.3, 0.3]",
        "diffusion.time_shift=3.0",
        f"data.tokenizer={tokenizer}",
        f"vision.image_size={IMAGE_SIZE}",
        f"vision.patch_size={PATCH_SIZE}",
        f"train.steps={steps}",
        f"train.device={device}",
        f"checkpoint.every={max(steps // 2, 1)}",
    ]


def write_report(out: Path, run_dir: Path, eval_dir: Path | None) -> Path:
    """``report.md`` with loss curves per modality, sample grids and the evaluation table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key in ("loss", "loss_text", "loss_image", "loss_video"):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("training losses per modality")
    fig.tight_layout()
    curves = out / "loss_curves.png"
    fig.savefig(curves, dpi=120)
    plt.close(fig)

    first, last = records[0], records[-1]
    lines = ["# megafusion quickstart report", "",
             f"Run directory: `{run_dir}` ({last['step']} steps).", "",
             "## Training", "", "![loss curves](loss_curves.png)", "",
             "| loss | first step | last step |", "|---|---|---|"]
    for key in ("loss_text", "loss_image", "loss_video"):
        if key in first and key in last:
            lines.append(f"| {key} | {first[key]:.4f} | {last[key]:.4f} |")
    if eval_dir is not None and (eval_dir / "metrics.json").is_file():
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        lines += ["", "## Evaluation (ShapesWorld, exact)", "",
                  "| evaluation | metric | value | chance | better |", "|---|---|---|---|---|"]
        for name, result in metrics["results"].items():
            head = metrics["headlines"].get(name)
            if head:
                better = "higher" if head.get("higher_is_better", True) else "lower"
                lines.append(f"| {name} | {head['metric']} | {head['value']:.4g} | {head['chance']:.4g} | {better} |")
            elif "skipped" in result:
                lines.append(f"| {name} | skipped: {result['skipped']} | | | |")
        for grid in sorted(eval_dir.glob("*.png")):
            lines += ["", f"![{grid.stem}]({grid.relative_to(out)})"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megafusion quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a smoke-test size (a minute)")
    size.add_argument("--full", action="store_true", help="a longer run that shows the research's trends")
    parser.add_argument("--steps", type=int, default=None, help="override the number of training steps")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    scale = SCALES["quick" if args.quick else "full" if args.full else "default"]
    steps = args.steps or scale.steps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()

    tokenizer, prefixes = prepare_data(out, scale, args.seed)

    stage = _stage(4, f"train a tiny Transfusion model for {steps} steps -> {out / 'run'}")
    from megafusion.config import load_config, validate
    from megafusion.training.loop import train

    cfg = load_config(REPO_CONFIGS / "tiny_transfusion.yaml", train_overrides(tokenizer, prefixes, steps, args.device))
    validate(cfg, world_size=1)
    run_dir = out / "run"
    train(cfg, run_dir)
    _done(stage)

    stage = _stage(5, f"evaluate -> {out / 'eval'}")
    eval_dir = out / "eval"
    from megafusion.eval import cli as eval_cli

    if eval_cli.main(["--run-dir", str(run_dir), "--out", str(eval_dir), "--n", str(scale.eval_n),
                      "--steps", str(scale.eval_ode_steps),
                      "--planning-candidates", str(scale.planning_candidates)]) != 0:
        print("[quickstart] evaluation failed; the report has the training part only", file=sys.stderr)
        eval_dir = None
    report = write_report(out, run_dir, eval_dir)
    _done(stage)
    print(f"\n[quickstart] finished in {time.time() - started:.0f}s. Report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
