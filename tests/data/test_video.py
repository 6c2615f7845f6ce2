"""Video reader: frame selection, resize/crop, and agreement of the PyAV and DALI backends."""

from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.data.video import (VideoDecodeError, VideoInfo, choose_backend, dali_available, probe, read_video,
                                   resize_crop, select_frames)

N_FRAMES, H, W, FPS = 12, 48, 64, 10
needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed "
                                "(pip install nvidia-dali-cuda130); the PyAV backend is tested without it")


def source_frames() -> np.ndarray:
    """[N, H, W, 3] smooth moving patterns (codecs keep them close; each frame is distinct)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    frames = []
    for t in range(N_FRAMES):
        r = 128 + 90 * np.sin(2 * np.pi * (x / W + t / N_FRAMES))
        g = 128 + 90 * np.cos(2 * np.pi * (y / H - t / N_FRAMES))
        b = np.full_like(x, 20.0 * t + 10)
        frames.append(np.stack([r, g, b], -1).round().astype(np.uint8))
    return np.stack(frames)


def write_clip(path: Path, codec: str, frames: np.ndarray) -> Path:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream(codec, rate=FPS)
        s.width, s.height = W, H
        s.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "mjpeg":
            s.options = {"q:v": "2"}
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    src = source_frames()
    return src, {"vp9": write_clip(d / "c.webm", "libvpx-vp9", src), "mjpeg": write_clip(d / "c.avi", "mjpeg", src),
                 "mpeg4": write_clip(d / "c.mp4", "mpeg4", src)}


def test_probe_and_frame_selection(clips):
    _, paths = clips
    for codec in ("vp9", "mjpeg"):
        info = probe(paths[codec])
        assert (info.codec, info.num_frames, info.width, info.height) == (codec, N_FRAMES, W, H)
        assert info.fps == pytest.approx(FPS)
    info = VideoInfo("vp9", 30.0, 100, W, H)
    assert select_frames(info, num_frames=4, stride=3, start=2) == [2, 5, 8, 11]
    assert select_frames(info, fps=7.5, num_frames=5) == [0, 4, 8, 12, 16]
    assert select_frames(info, fps=12) == [int(k * 2.5) for k in range(40)]
    assert select_frames(VideoInfo("vp9", 30.0, 5, W, H), stride=2) == [0, 2, 4]


def test_pyav_decodes_the_selected_frames(clips):
    src, paths = clips
    for codec in ("vp9", "mjpeg", "mpeg4"):
        frames = read_video(paths[codec], backend="pyav", start=1, stride=2, num_frames=4).numpy()
        assert frames.shape == (4, H, W, 3) and frames.dtype == np.uint8
        for got, k in zip(frames, [1, 3, 5, 7]):
            err = np.abs(got.astype(int)[None] - src.astype(int)).mean(axis=(1, 2, 3))
            assert err.argmin() == k and err[k] < 10, (codec, k, err)  # neighbours are > 20 away


def test_resize_crop_against_reference():
    frames = torch.zeros(2, 40, 80, 3, dtype=torch.uint8)
    frames[:, :, :10] = 200  # left edge bright: cropped away by a center crop to a square
    out = resize_crop(frames, 20)
    assert out.shape == (2, 20, 20, 3) and (out == 0).all()
    flat = torch.full((1, 30, 45, 3), 77, dtype=torch.uint8)
    assert (resize_crop(flat, (10, 12)) == 77).all() and resize_crop(flat, (10, 12)).shape == (1, 10, 12, 3)
    # downscale by 2 with antialiasing = 2x2 box average for this smooth ramp
    ramp = torch.arange(64, dtype=torch.uint8).repeat_interleave(2).reshape(1, 1, 128, 1).expand(1, 4, 128, 3)
    out = resize_crop(ramp.contiguous(), (2, 64))
    assert (out[0, 0, :, 0] == torch.arange(64)).all()


@needs_dali
@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_dali_cpu_matches_pyav(clips, codec):
    _, paths = clips
    kw = dict(start=1, stride=3, num_frames=3, size=32)
    ref = read_video(paths[codec], backend="pyav", **kw).int()
    got = read_video(paths[codec], backend="dali-cpu", **kw).int()
    assert got.shape == ref.shape == (3, 32, 32, 3)
    diff = (got - ref).abs().float()
    # same frames; only the YUV->RGB conversion rounds differently
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())
    assert choose_backend(codec) == "dali-cpu"


@needs_dali
def test_dali_cpu_refuses_other_codecs_with_a_clear_error(clips):
    _, paths = clips
    with pytest.raises(VideoDecodeError, match="DALI on CPU decodes only"):
        read_video(paths["mpeg4"], backend="dali-cpu")
    assert choose_backend("mpeg4") == "pyav" and choose_backend("h264") == "pyav"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
@needs_dali
@pytest.mark.parametrize("codec", ["vp9", "mjpeg", "mpeg4"])
def test_dali_gpu_matches_pyav(clips, codec):
    _, paths = clips
    ref = read_video(paths[codec], backend="pyav", num_frames=5).int()
    got = read_video(paths[codec], backend="dali-gpu", num_frames=5, device="cuda")
    assert got.is_cuda
    diff = (got.cpu().int() - ref).abs().float()
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())
    assert choose_backend(codec, "cuda") == "dali-gpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is visible")
@needs_dali
def test_dali_gpu_frames_stay_valid_after_later_decodes(clips):
    """Frames come out of DALI through DLPack (no copy): a later decode through the same
    pipeline (other frame indices, an input) must not overwrite the buffer of an earlier one."""
    _, paths = clips
    first = read_video(paths["vp9"], backend="dali-gpu", num_frames=4, device="cuda")
    kept = first.clone()
    for start in (4, 8, 0):
        read_video(paths["vp9"], backend="dali-gpu", num_frames=4, start=start, device="cuda")
    torch.cuda.synchronize()
    assert torch.equal(first, kept)
    assert first.device.index == torch.cuda.current_device()


def test_corrupt_and_missing_files_raise(tmp_path):
    bad = tmp_path / "bad.webm"
    bad.write_bytes(b"\x1aE\xdf\xa3 definitely not a video")
    with pytest.raises(VideoDecodeError, match="bad.webm"):
        read_video(bad, backend="pyav")
    with pytest.raises(VideoDecodeError, match="not found"):
        read_video(tmp_path / "nope.webm")


def test_without_dali_auto_falls_back_to_pyav(clips, monkeypatch):
    import megafusion.data.video as video

    monkeypatch.setattr(video, "dali_available", lambda: False)
    _, paths = clips
    assert video.choose_backend("vp9") == "pyav" and video.choose_backend("vp9", "cuda") == "pyav"
    assert read_video(paths["vp9"], num_frames=2).shape == (2, H, W, 3)  # auto -> pyav
    with pytest.raises(ImportError, match="pip install nvidia-dali"):
        read_video(paths["vp9"], backend="dali-cpu")
