"""``megafusion generate``: text, images, captions and action rollouts from a trained run.

    megafusion generate --run-dir runs/tiny --prompt "a red circle" --image-prompt --out out/
    megafusion generate --run-dir runs/tiny --caption image.png --out out/
    megafusion generate --run-dir runs/tiny --rollout 3 --out out/        # held-out action video 3

Writes the images (PNG) and ``generation.json`` under ``--out``. The decoding itself is
``megafusion.inference.generate`` (``Generator``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from pathlib import Path

import numpy as np

from megafusion.inference.generate import Generator, SamplingOptions
from megafusion.logging_setup import configure_logging, megatron_warnings

class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``prog: error: argument --steps: ...`` and a pointer
    to ``--help``, instead of the usage block above it (exit code 2 as usual)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def checked(parse: type, ok, requirement: str):
    """An argparse ``type`` that parses with ``parse`` (int or float) and refuses values that
    fail ``ok`` or, for floats, are NaN or infinite (``nan`` fails every comparison, so a
    range check alone would let it through), saying what a valid value is."""
    noun = "an integer" if parse is int else "a number"

    def check(text: str):
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}; give {requirement}") from None
        if parse is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text} is not a finite number; give {requirement}")
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {requirement}")
        return value

    return check


positive_float = checked(float, lambda v: v > 0, "a number > 0")

DEVICES = ("auto", "cpu", "cuda")
RUN_DIR_EXPECTED = ("a run directory of `megafusion train` (config.yaml + checkpoints/) or of `megafusion export` "
                    "(config.json + model.safetensors)")


def run_dir_problem(run_dir: str | Path) -> str | None:
    """Why ``--run-dir`` cannot be a run at all (missing, a file), in one line; None if it may be.
    What a directory holds is checked by ``megafusion.inference.loading`` (it names the file it lacks)."""
    path = Path(run_dir)
    if not path.exists():
        return f"--run-dir {run_dir}: does not exist; give {RUN_DIR_EXPECTED}"
    if not path.is_dir():
        return f"--run-dir {run_dir}: is a file, not a directory; give {RUN_DIR_EXPECTED}"
    return None


def out_dir_problem(out: str | Path | None, flag: str = "--out") -> str | None:
    """Why an output directory cannot be written (an existing file in its place), or None."""
    if out is None:
        return None
    for parent in (Path(out), *Path(out).parents):
        if parent.exists():
            if not parent.is_dir():
                return f"{flag} {out}: {parent} is a file; give a directory to write into"
            return None
    return None


def device_problem(device: str | None) -> str | None:
    """Why ``--device`` cannot be used here (not one of :data:`DEVICES`, or cuda without a GPU), or None."""
    if device is None:
        return None
    if device not in DEVICES:
        return f"--device {device}: choose from {', '.join(DEVICES)}"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return "--device cuda: no CUDA GPU is visible here; give --device cpu or auto"
    return None


def action_list(text: str) -> list[str]:
    """``--actions``: a non-empty comma-separated list of ShapesWorld actions, canonical names."""
    from megafusion.data.shapes import canonical_action

    names = [a.strip() for a in text.split(",") if a.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r} names no action; give e.g. up,left,stay")
    try:
        return [canonical_action(a) for a in names]
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_ode_arguments(p: argparse.ArgumentParser) -> None:
    """The image/frame sampling flags shared by ``megafusion generate`` and ``megafusion eval``."""
    p.add_argument("--steps", type=checked(int, lambda v: v >= 1, "an integer >= 1 (ODE steps per image or frame)"),
                   default=25, help="ODE steps per image or frame")
    p.add_argument("--sampler", choices=("euler", "heun"), default="euler")
    p.add_argument("--cfg", type=checked(float, lambda v: True, "a finite guidance scale (1 = off)"), default=3.0,
                   help="classifier-free guidance scale (1 = off)")
    shift = checked(float, lambda v: v > 0, "a time shift > 0 (1 = no shift)")
    p.add_argument("--shift", type=shift, default=None,
                   help="time shift of the ODE grid for images (larger: more steps near pure noise); "
                        "default: the run's diffusion.time_shift")
    p.add_argument("--frame-shift", type=shift, default=None,
                   help="the same for video frames; default: the run's diffusion.frame_time_shift")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="megafusion generate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", required=True, help="a `megafusion train` run dir (config.yaml + checkpoints/) or a "
                                                    "`megafusion export` directory (config.json + model.safetensors)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--prompt", default=None, help="text prompt (continuation; with --image-prompt, image caption; "
                                                 "with --rollout, overrides the episode caption)")
    p.add_argument("--image-prompt", action="store_true", help="append <boi> to the prompt: generate an image first")
    p.add_argument("--caption", metavar="IMAGE.png", default=None, help="caption this image (image-to-text)")
    p.add_argument("--rollout", type=checked(int, lambda v: v >= 0, "a held-out video index >= 0"), metavar="INDEX",
                   default=None,
                   help="roll out held-out ShapesWorld action video INDEX from its context frames and actions")
    p.add_argument("--actions", type=action_list, default=None,
                   help="comma-separated actions for --rollout (up,down,left,right,stay; W/A/S/D), replacing the "
                        "episode's")
    add_ode_arguments(p)
    p.add_argument("--max-new-tokens", type=checked(int, lambda v: v >= 1, "an integer >= 1"), default=64)
    p.add_argument("--temperature", type=checked(float, lambda v: v >= 0, "a temperature >= 0 (0 = greedy)"),
                   default=0.0, help="0 = greedy")
    # No default cut: SamplingOptions' top_k 0 means "keep every token", but on the command
    # line `--top-k 0` reads as "keep no token", so it is refused rather than guessed at.
    p.add_argument("--top-k", type=checked(int, lambda v: v >= 1, "an integer >= 1 (leave --top-k out to keep every "
                                                                  "token)"),
                   default=None, help="sample among the K most likely tokens (needs --temperature > 0)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, choices=DEVICES, help="default: the run's train.device")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole sequence per token (reference)")
    p.add_argument("--out", required=True, help="output directory (PNG files + generation.json)")
    return p


def _save_png(image: np.ndarray, path: Path) -> str:
    from megafusion.data.shapes import save_png

    save_png(image, path)
    return path.name


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.top_k is not None and args.temperature == 0:
        parser.error(f"argument --top-k: {args.top_k} has no effect with --temperature 0 (greedy decoding); "
                     "give --temperature > 0 or leave --top-k out")
    if args.actions is not None and args.rollout is None:
        parser.error("argument --actions: only --rollout reads it; add --rollout INDEX or leave --actions out")
    modes = sum([args.caption is not None, args.rollout is not None])
    if modes > 1:
        print("megafusion generate: choose one of --caption and --rollout", file=sys.stderr)
        return 2
    if modes == 0 and args.prompt is None:
        print("megafusion generate: give --prompt (text or, with --image-prompt, an image caption), "
              "--caption IMAGE.png or --rollout INDEX", file=sys.stderr)
        return 2
    # What can be told before loading anything: one line each, exit 2.
    caption_image = None
    problem = (run_dir_problem(args.run_dir) or out_dir_problem(args.out) or device_problem(args.device))
    if problem is None and args.caption is not None:
        caption_image, problem = _read_caption_image(args.caption)
    if problem is not None:
        print(f"megafusion generate: {problem}", file=sys.stderr)
        return 2
    configure_logging()
    from megafusion.inference.loading import load_run, run_device
    from megafusion.parallel import cpu_compat

    with contextlib.ExitStack() as stack:
        noise = stack.enter_context(megatron_warnings())  # megatron-core's start-up warnings: one line
        try:  # on CPU the compatibility layer, then the run, both for the whole command
            stack.enter_context(cpu_compat.applied(run_device(args.run_dir, args.device)))
            loaded = stack.enter_context(load_run(args.run_dir, args.step, args.device))
        except (FileNotFoundError, ValueError) as err:
            print(f"megafusion generate: {err}", file=sys.stderr)
            return 2
        noise.summarize()
        gen = Generator.from_run(loaded, use_cache=not args.no_cache)
        opts = SamplingOptions(args.temperature, 0 if args.top_k is None else args.top_k, args.steps, args.sampler, args.cfg, args.seed,
                               args.shift, args.frame_shift)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        record: dict = {"run_dir": str(args.run_dir), "step": loaded.step, "seed": args.seed,
                        "sampler": args.sampler, "steps": args.steps, "cfg": args.cfg, "shift": args.shift,
                        "frame_shift": args.frame_shift}
        if args.caption is not None:
            record.update(mode="caption", image=str(args.caption),
                          text=gen.caption(caption_image, args.max_new_tokens, opts))
        elif args.rollout is not None:
            record.update(mode="rollout", **_rollout(gen, args, opts, out))
        else:
            result = gen.generate(args.prompt, args.max_new_tokens, opts, force_image=args.image_prompt)
            names = [_save_png(im, out / f"image_{k}.png") for k, im in enumerate(result.images)]
            record.update(mode="image" if args.image_prompt else "text", prompt=args.prompt, text=result.text,
                          images=names)
        (out / "generation.json").write_text(json.dumps(record, indent=2) + "\n")
        print(json.dumps(record, indent=2))
    return 0


def _read_caption_image(path: str) -> tuple[np.ndarray | None, str | None]:
    """(the image of ``--caption``, None) or (None, why it cannot be read)."""
    from megafusion.data.shapes import load_png

    if not Path(path).is_file():
        what = "is a directory" if Path(path).is_dir() else "does not exist"
        return None, f"--caption {path}: {what}; give a PNG image file"
    try:
        return load_png(path), None
    except Exception as err:  # PIL's UnidentifiedImageError, a truncated file, ...: say so in one line
        return None, f"--caption {path}: cannot be read as an image ({type(err).__name__}: {err}); give a PNG file"


def _rollout(gen: Generator, args, opts: SamplingOptions, out: Path) -> dict:
    from megafusion.data.shapes import HELDOUT_SEED
    from megafusion.eval.world import rollout_heldout
    from megafusion.vision.images import save_grid

    r = rollout_heldout(gen, args.rollout, opts, actions=args.actions, caption=args.prompt)
    c = r.context_frames
    names = [_save_png(f, out / f"frame_{c + k}.png") for k, f in enumerate(r.frames)]
    save_grid(list(r.truth) + list(r.truth[:c]) + list(r.frames), out / "rollout_grid.png", ncols=len(r.truth))
    return {"index": r.index, "seed": HELDOUT_SEED, "actions": r.actions, "caption": r.caption,
            "context_frames": c, "frames": names, "grid": "rollout_grid.png",
            "grid_rows": ["ground truth", "context + predicted"]}


if __name__ == "__main__":
    sys.exit(main())
