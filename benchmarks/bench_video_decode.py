"""Video decoding throughput (frames/s) per backend and codec.

    python3 -m pytest benchmarks/bench_video_decode.py -o addopts="" --benchmark-only \
        --benchmark-json benchmarks/results/video_decode_cpu.json
    python3 benchmarks/bench_video_decode.py benchmarks/results/video_decode_cpu.json

Clips: 48 frames of 256x256 smooth moving patterns at 24 fps, written by PyAV as VP9
(WebM), MJPEG (AVI) and H.264 (MP4; MPEG-4 Part 2 where the PyAV build has no libx264).
Each round decodes the whole clip to RGB uint8 through ``megafusion.data.video.read_video``
(no resize). Backends: ``pyav`` (CPU, all codecs), ``dali-cpu`` (VP8/VP9/MJPEG only),
``dali-gpu`` (needs a GPU and DALI); cases that cannot run skip with the reason.
Frames/s go into each case's ``extra_info``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.data.video import DALI_CPU_CODECS, dali_available, read_video

FRAMES, SIZE, FPS = 48, 256, 24


def _encoders():
    import av

    h264 = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    return {"vp9": ("libvpx-vp9", "webm"), "mjpeg": ("mjpeg", "avi"), "h264": (h264, "mp4")}


def write_clip(path: Path, encoder: str) -> Path:
    import av

    y, x = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    with av.open(str(path), "w") as c:
        s = c.add_stream(encoder, rate=FPS)
        s.width = s.height = SIZE
        s.pix_fmt = "yuvj420p" if encoder == "mjpeg" else "yuv420p"
        for t in range(FRAMES):
            img = np.stack([128 + 100 * np.sin(x / 17 + t / 5), 128 + 100 * np.cos(y / 23 - t / 7),
                            (x + y + 4 * t) % 256], -1).astype(np.uint8)
            for p in s.encode(__import__("av").VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench_clips")
    return {codec: write_clip(d / f"clip.{ext}", enc) for codec, (enc, ext) in _encoders().items()}


@pytest.mark.parametrize("codec", ["vp9", "mjpeg", "h264"])
@pytest.mark.parametrize("backend", ["pyav", "dali-cpu", "dali-gpu"])
def test_decode_frames_per_second(benchmark, clips, backend, codec):
    if backend != "pyav" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
    if backend == "dali-cpu" and codec not in DALI_CPU_CODECS:
        pytest.skip(f"DALI on CPU does not decode {codec}")
    if backend == "dali-gpu" and not torch.cuda.is_available():
        pytest.skip("dali-gpu needs a CUDA GPU")
    device = "cuda" if backend == "dali-gpu" else "cpu"

    def decode():
        frames = read_video(clips[codec], backend=backend, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        return frames

    frames = benchmark.pedantic(decode, rounds=5, warmup_rounds=1)
    assert frames.shape == (FRAMES, SIZE, SIZE, 3)
    benchmark.extra_info.update(frames_per_s=FRAMES / benchmark.stats.stats.median, codec=codec, backend=backend,
                                device=torch.cuda.get_device_name() if device == "cuda" else "cpu")


def print_table(path: str) -> None:
    rows = [b["extra_info"] for b in json.loads(Path(path).read_text())["benchmarks"]]
    print(f"{'backend':<10} {'codec':<6} {'frames/s':>9}  device")
    for r in sorted(rows, key=lambda r: (r["codec"], r["backend"])):
        print(f"{r['backend']:<10} {r['codec']:<6} {r['frames_per_s']:>9.0f}  {r['device']}")


if __name__ == "__main__":
    print_table(sys.argv[1])
