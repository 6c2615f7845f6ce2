"""Video decoding to RGB frames: PyAV on CPU, NVIDIA DALI on CPU or GPU.

    frames = read_video("clip.webm", num_frames=16, fps=4, size=64)   # [T, 64, 64, 3] uint8

Backends:

- ``pyav``: FFmpeg through PyAV, every codec, CPU.
- ``dali-cpu``: DALI's ``decoders.video`` on CPU; VP8, VP9 and MJPEG only.
- ``dali-gpu``: DALI with ``device="mixed"`` (NVDEC): also H.264, HEVC, AV1, MPEG-4; needs a GPU.
- ``auto``: ``dali-gpu`` when the device is CUDA and DALI is installed, else ``dali-cpu`` for
  the codecs it decodes, else ``pyav``.

DALI is optional (``pip install nvidia-dali-cuda130``) and imported only when used. All
backends decode the same frame indices (chosen here from the container's frame rate and
count) and share the resize/crop, so they differ only by the decoders' YUV->RGB rounding.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

BACKENDS = ("auto", "pyav", "dali-cpu", "dali-gpu")
DALI_CPU_CODECS = frozenset({"vp8", "vp9", "mjpeg"})
DALI_GPU_CODECS = DALI_CPU_CODECS | {"h264", "hevc", "av1", "mpeg4"}


class VideoDecodeError(RuntimeError):
    """The file cannot be opened or decoded (names the file and the reason)."""


@dataclass(frozen=True)
class VideoInfo:
    codec: str
    fps: float
    num_frames: int
    width: int
    height: int


def probe(path: str | os.PathLike) -> VideoInfo:
    """Codec, frame rate, frame count (counted from packets when the container has none), size."""
    import av

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{path}: no video stream")
            stream = container.streams.video[0]
            ctx = stream.codec_context
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            n = stream.frames
            if not n:
                n = sum(1 for pkt in container.demux(stream) if pkt.size)
            return VideoInfo(ctx.name, fps, int(n), ctx.width, ctx.height)
    except VideoDecodeError:
        raise
    except Exception as err:
        raise VideoDecodeError(f"{path}: {type(err).__name__}: {err}") from err


def select_frames(info: VideoInfo, num_frames: int | None = None, stride: int = 1, fps: float | None = None,
                  start: int = 0) -> list[int]:
    """Frame indices to decode: from ``start``, every ``stride``-th frame, or resampled to ``fps``.

    ``num_frames`` caps the clip length (``None``: to the end of the video).
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if fps is not None:
        if fps <= 0 or info.fps <= 0:
            raise ValueError(f"cannot resample to fps={fps}: the video reports fps={info.fps}")
        step = info.fps / fps
        indices, k = [], 0
        while True:
            i = start + int(math.floor(k * step + 1e-9))
            if i >= info.num_frames or (num_frames is not None and len(indices) == num_frames):
                break
            indices.append(i)
            k += 1
        return indices
    indices = list(range(start, info.num_frames, stride))
    return indices[:num_frames] if num_frames is not None else indices


def resize_crop(frames: torch.Tensor, size: int | tuple[int, int] | None) -> torch.Tensor:
    """[T, H, W, 3] uint8 -> shorter side resized to ``size`` (antialiased bilinear), center crop.

    ``size`` int: square crop; (h, w): resize to cover then crop to exactly that; None: unchanged.
    """
    if size is None or frames.shape[0] == 0:
        return frames
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = frames.shape[1:3]
    scale = max(out_h / h, out_w / w)
    new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    x = frames.permute(0, 3, 1, 2)
    if (new_h, new_w) != (h, w):
        x = F.interpolate(x.float(), size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False)
        x = x.round().clamp(0, 255).to(torch.uint8)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    return x[:, :, top:top + out_h, left:left + out_w].permute(0, 2, 3, 1).contiguous()


# ----------------------------------------------------------------------------- backends
def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def decode_pyav(path: str | os.PathLike, indices: list[int]) -> torch.Tensor:
    """Decodes frames ``indices`` (sorted, unique) with PyAV: [T, H, W, 3] uint8."""
    import av

    wanted = set(indices)
    last = max(indices) if indices else -1
    frames = {}
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for i, frame in enumerate(container.decode(stream)):
                if i in wanted:
                    frames[i] = frame.to_ndarray(format="rgb24")
                if i >= last:
                    break
    except Exception as err:
        raise VideoDecodeError(f"{path}: {type(err).__name__}: {err}") from err
    missing = [i for i in indices if i not in frames]
    if missing:
        raise VideoDecodeError(f"{path}: frames {missing[:5]} not decoded (the file has fewer frames)")
    return torch.from_numpy(np.stack([frames[i] for i in indices])) if indices else torch.empty(0, 0, 0, 3,
                                                                                                 dtype=torch.uint8)


class _DaliDecoder:
    """One built DALI pipeline (``fn.decoders.video`` fed by two external sources: the file's
    bytes and the frame indices to decode) and the lock that serialises its runs: a pipeline
    runs one batch at a time."""

    def __init__(self, device: str, device_id: int | None) -> None:
        from nvidia.dali import fn, pipeline_def, types

        @pipeline_def(batch_size=1, num_threads=2, device_id=device_id, prefetch_queue_depth=1, exec_dynamic=True)
        def pipe():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            # Frame indices are an argument input: one pipeline decodes any frame list.
            frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
            return fn.decoders.video(encoded, device=device, frames=frames)

        self.pipe = pipe()
        self.pipe.build()
        self.lock = threading.Lock()

    def decode(self, data: np.ndarray, indices: list[int]):
        with self.lock:
            self.pipe.feed_input("encoded", [data])
            self.pipe.feed_input("frames", [np.asarray(indices, dtype=np.int32)])
            (out,) = self.pipe.run()
        return out[0]


@lru_cache(maxsize=None)
def _dali_pipeline(device: str, device_id: int | None) -> _DaliDecoder:
    """The process's DALI decoder for ``device`` ("cpu" or "mixed") on GPU ``device_id``
    (None on CPU): built once per device, whatever frames are asked for."""
    return _DaliDecoder(device, device_id)


def _dali_to_torch(sample, gpu: bool, device_id: int) -> torch.Tensor:
    """A decoded DALI sample as a torch tensor, through DLPack (no copy: the tensor keeps
    DALI's buffer alive, which the dynamic executor does not reuse while it is referenced)
    where the installed DALI offers it, else copied."""
    if hasattr(sample, "__dlpack__"):
        try:
            return torch.from_dlpack(sample)  # on the GPU: DALI's stream is ordered before torch's current one
        except (TypeError, RuntimeError, BufferError):
            pass  # a DALI whose DLPack export torch cannot take: copy below
    if gpu:
        from nvidia.dali.plugin.pytorch import feed_ndarray

        t = torch.empty(sample.shape(), dtype=torch.uint8, device=f"cuda:{device_id}")
        feed_ndarray(sample, t, cuda_stream=torch.cuda.current_stream(device_id))
        return t
    return torch.from_numpy(np.array(sample))


def decode_dali(path: str | os.PathLike, indices: list[int], gpu: bool = False,
                device_id: int | None = None) -> torch.Tensor:
    """Decodes frames ``indices`` with DALI: [T, H, W, 3] uint8 (on GPU ``device_id`` when
    ``gpu``; None: this process's current CUDA device, ``torch.cuda.current_device()``)."""
    if not dali_available():
        raise ImportError("the DALI video backend needs NVIDIA DALI: pip install nvidia-dali-cuda130 "
                          "(or use backend='pyav')")
    if gpu and not torch.cuda.is_available():
        raise RuntimeError("backend 'dali-gpu' needs a CUDA GPU; use 'dali-cpu' or 'pyav'")
    if not indices:
        return torch.empty(0, 0, 0, 3, dtype=torch.uint8)
    if gpu and device_id is None:
        device_id = torch.cuda.current_device()
    decoder = _dali_pipeline("mixed" if gpu else "cpu", device_id if gpu else None)
    try:
        sample = decoder.decode(np.fromfile(str(path), dtype=np.uint8), indices)
    except Exception as err:
        raise VideoDecodeError(f"{path}: DALI: {type(err).__name__}: {err}") from err
    return _dali_to_torch(sample, gpu, device_id if gpu else 0)


def choose_backend(codec: str, device: str | torch.device = "cpu") -> str:
    """``auto``: DALI on GPU when possible, DALI on CPU for VP8/VP9/MJPEG, else PyAV."""
    dev = torch.device(device)
    if dev.type == "cuda" and dali_available() and codec in DALI_GPU_CODECS:
        return "dali-gpu"
    if dali_available() and codec in DALI_CPU_CODECS:
        return "dali-cpu"
    return "pyav"


def read_video(path: str | os.PathLike, *, backend: str = "auto", num_frames: int | None = None, stride: int = 1,
               fps: float | None = None, start: int = 0, size: int | tuple[int, int] | None = None,
               device: str | torch.device = "cpu") -> torch.Tensor:
    """Reads a clip: [T, H, W, 3] uint8 on ``device`` (see the module docstring for backends).

    Frame choice: ``select_frames`` (``start``, ``stride`` or ``fps``, ``num_frames``).
    ``size``: resize + center crop (``resize_crop``); None keeps the decoded size.
    """
    if backend not in BACKENDS:
        raise ValueError(f"video backend must be one of {BACKENDS}, got {backend!r}")
    if not Path(path).is_file():
        raise VideoDecodeError(f"{path}: file not found")
    info = probe(path)
    indices = select_frames(info, num_frames, stride, fps, start)
    if backend == "auto":
        backend = choose_backend(info.codec, device)
    if backend == "dali-cpu" and info.codec not in DALI_CPU_CODECS:
        raise VideoDecodeError(f"{path}: DALI on CPU decodes only {sorted(DALI_CPU_CODECS)}, this is "
                               f"{info.codec}; use backend='pyav' or 'dali-gpu'")
    if backend == "pyav":
        frames = decode_pyav(path, indices)
    else:
        dev = torch.device(device)
        # A bare "cuda" means this process's current device (each rank's own), not GPU 0.
        frames = decode_dali(path, indices, gpu=backend == "dali-gpu",
                             device_id=dev.index if dev.type == "cuda" else None)
    frames = resize_crop(frames, size)
    return frames.to(device)
