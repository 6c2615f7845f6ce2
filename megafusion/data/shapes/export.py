"""Write ShapesWorld to files in the formats ``tools/preprocess_data.py`` reads.

Layout under ``out_dir`` (paths inside JSONL lines are relative to ``out_dir``)::

    text.jsonl          {"text": ...}
    image_text.jsonl    {"image": "images/000000.png", "text": caption}
    vqa.jsonl           {"image": ..., "question": ..., "answer": ..., "choices": [...], "kind": ...}
    vqa_docs.jsonl      {"image": ..., "text": "Question: .. Answer: .. Question: .."}: an image's VQA pairs
                        as one image-first training document (preprocess as image-text, --image-first)
    video.jsonl         {"frames": ["videos/000000/000.png", ...], "video": "videos/000000.webm", "text": caption}
    action_video.jsonl  {"frames": [...], "video": ..., "actions": ["up", ...], "context_frames": 4, "text": ...}
    manifest.json       seed, counts, world config (its ``holdout`` mode), the held-out compositions
                        (when ``holdout`` is "compositions": none of them occurs in any file) and the files above

``"video"`` is present only when PyAV is installed (VP9 in WebM, lossless mode, or MJPEG
in AVI); the PNG frames are always written and are exact.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .text import vqa_document
from .world import ShapesWorld, WorldConfig

VIDEO_CODECS = {"vp9": ("libvpx-vp9", "webm", "yuv420p", {"lossless": "1"}),
                "mjpeg": ("mjpeg", "avi", "yuvj420p", {"q:v": "2"})}


def have_pyav() -> bool:
    return importlib.util.find_spec("av") is not None


def save_png(image: np.ndarray, path: str | Path) -> None:
    """Writes an [H, W, 3] uint8 array as a PNG."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"save_png({path}): expected [H, W, 3] uint8, got {image.shape} {image.dtype}")
    try:
        from PIL import Image
    except ImportError:  # matplotlib is a declared dependency
        import matplotlib.image

        matplotlib.image.imsave(str(path), image)
        return
    Image.fromarray(image).save(path)


def load_png(path: str | Path) -> np.ndarray:
    """[H, W, 3] uint8 array of a PNG."""
    try:
        from PIL import Image
    except ImportError:
        import matplotlib.image

        return (matplotlib.image.imread(str(path))[..., :3] * 255).round().astype(np.uint8)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_video(frames: np.ndarray, path: str | Path, codec: str = "vp9", fps: int = 8) -> None:
    """Encodes [T, H, W, 3] uint8 frames with PyAV (``codec``: "vp9" or "mjpeg")."""
    import av

    if codec not in VIDEO_CODECS:
        raise ValueError(f"unknown video codec {codec!r}; choose one of {sorted(VIDEO_CODECS)}")
    name, _, pix_fmt, options = VIDEO_CODECS[codec]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(name, rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = pix_fmt
        stream.options = dict(options)
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_clip(frames: np.ndarray, out_dir: Path, rel: str, codec: str | None) -> dict:
    (out_dir / rel).mkdir(parents=True, exist_ok=True)
    names = []
    for t, frame in enumerate(frames):
        names.append(f"{rel}/{t:03d}.png")
        save_png(frame, out_dir / names[-1])
    record: dict = {"frames": names}
    if codec is not None:
        record["video"] = f"{rel}.{VIDEO_CODECS[codec][1]}"
        write_video(frames, out_dir / record["video"], codec)
    return record


def _write_jsonl(path: Path, records) -> Path:
    tmp = path.with_suffix(".jsonl.tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    tmp.replace(path)  # never leave a half-written file under the final name
    return path


def write_dataset(out_dir: str | Path, seed: int = 0, n_text: int = 100, n_image: int = 100, n_video: int = 20,
                  n_action: int = 20, image_size: int = 32, video_codec: str | None = "auto",
                  config: WorldConfig | None = None, holdout: str = "none") -> dict[str, Path]:
    """Writes ShapesWorld samples 0..n-1 of each kind under ``out_dir``; returns the files.

    ``video_codec``: "vp9", "mjpeg", None (PNG frames only) or "auto" (vp9 when PyAV is
    installed). ``holdout`` ("none" | "compositions") applies when no ``config`` is given. Returns
    {"text", "image_text", "vqa", "vqa_docs", "video", "action_video", "manifest"} -> path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if video_codec == "auto":
        video_codec = "vp9" if have_pyav() else None
    if video_codec is not None and not have_pyav():
        raise RuntimeError(f"video_codec={video_codec!r} needs PyAV: pip install av (or pass video_codec=None)")
    world = ShapesWorld(config=config or WorldConfig(seed=seed, image_size=image_size, holdout=holdout))

    paths = {"text": _write_jsonl(out / "text.jsonl", ({"text": world.text_document(i).text} for i in range(n_text)))}

    (out / "images").mkdir(exist_ok=True)
    image_records, vqa_records, vqa_docs = [], [], []
    for i in range(n_image):
        s = world.image_text(i)
        rel = f"images/{i:06d}.png"
        save_png(s.image, out / rel)
        image_records.append({"image": rel, "text": s.caption})
        vqa_records += [{"image": rel, "question": v.question, "answer": v.answer, "choices": list(v.choices),
                         "kind": v.kind} for v in s.vqa]
        vqa_docs.append({"image": rel, "text": vqa_document(s.vqa)})
    paths["image_text"] = _write_jsonl(out / "image_text.jsonl", image_records)
    paths["vqa"] = _write_jsonl(out / "vqa.jsonl", vqa_records)
    paths["vqa_docs"] = _write_jsonl(out / "vqa_docs.jsonl", vqa_docs)

    video_records = []
    for i in range(n_video):
        v = world.video(i)
        video_records.append({**_write_clip(v.frames, out, f"videos/{i:06d}", video_codec), "text": v.caption})
    paths["video"] = _write_jsonl(out / "video.jsonl", video_records)

    action_records = []
    for i in range(n_action):
        a = world.action_video(i)
        action_records.append({**_write_clip(a.frames, out, f"action_videos/{i:06d}", video_codec),
                               "actions": a.actions, "context_frames": a.context_frames, "text": a.caption,
                               "agent_path": a.path.tolist()})
    paths["action_video"] = _write_jsonl(out / "action_video.jsonl", action_records)

    manifest = {"seed": world.config.seed, "config": asdict(world.config), "video_codec": video_codec,
                "counts": {"text": n_text, "image_text": n_image, "video": n_video, "action_video": n_action},
                "holdout_compositions": ([[kind, list(value)] for kind, value in world.holdout.compositions()]
                                         if world.holdout is not None else None),
                "files": {k: p.name for k, p in paths.items()}}
    paths["manifest"] = out / "manifest.json"
    paths["manifest"].write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m megafusion.data.shapes --out DIR``: write a ShapesWorld dataset."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m megafusion.data.shapes", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    p.add_argument("--n-text", type=int, default=1000)
    p.add_argument("--n-image", type=int, default=1000)
    p.add_argument("--n-video", type=int, default=200)
    p.add_argument("--n-action", type=int, default=200)
    p.add_argument("--holdout", default="compositions", choices=("compositions", "none"),
                   help="keep the world's held-out compositions (megafusion.data.shapes.holdout) out of every "
                        "file (default), so `megafusion eval --world DIR/manifest.json` scores them as unseen; "
                        "none: keep all")
    p.add_argument("--video-codec", default="auto", choices=("auto", "vp9", "mjpeg", "none"),
                   help="also encode clips as video files (needs PyAV); 'none' writes PNG frames only")
    a = p.parse_args(argv)
    paths = write_dataset(a.out, a.seed, a.n_text, a.n_image, a.n_video, a.n_action, a.image_size,
                          None if a.video_codec == "none" else a.video_codec, holdout=a.holdout)
    for kind, path in paths.items():
        print(f"{kind:>13}: {path}")
    return 0
