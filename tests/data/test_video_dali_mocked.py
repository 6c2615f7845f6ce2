"""The DALI video path with DALI mocked (it is not installed on CPU machines): which GPU it
decodes on, how many pipelines it builds, and how frames are handed over.

Before: a bare ``cuda`` device decoded on GPU 0 in every rank (``dev.index or 0``), and a
pipeline was built (and cached, 16 at most) per distinct frame list. Now the frame indices
are an input of one pipeline per device, and the frames come out through DLPack.
"""

import sys
import types

import numpy as np
import pytest
import torch

from megafusion.data import video
from megafusion.data.video import VideoDecodeError, VideoInfo, decode_dali, read_video


class FakeDali:
    """Just enough of nvidia.dali: pipeline_def / external_source / decoders.video, recording
    what megafusion passes. A run decodes frame i of the fed file as a [2, 2, 3] block of i."""

    def __init__(self):
        self.built = []  # (pipeline_def kwargs, decoders.video kwargs) per pipeline built
        self.fed = []  # (pipeline index, input name, data)
        self.outputs = []
        self.fail = False
        fake = self

        class Pipe:
            def __init__(self, index):
                self.index, self.inputs = index, {}

            def build(self):
                pass

            def feed_input(self, name, data):
                fake.fed.append((self.index, name, data))
                self.inputs[name] = data

            def run(self):
                if fake.fail:
                    raise RuntimeError("decoder stopped")
                frames = self.inputs["frames"][0]
                out = np.broadcast_to(frames.astype(np.uint8)[:, None, None, None], (len(frames), 2, 2, 3)).copy()
                fake.outputs.append(out)
                return ([out],)

        def pipeline_def(**kwargs):
            def decorate(graph):
                def build_pipe():
                    fake._op = None
                    graph()
                    fake.built.append((kwargs, fake._op))
                    return Pipe(len(fake.built) - 1)
                return build_pipe
            return decorate

        def external_source(**kwargs):
            return ("external_source", kwargs["name"], kwargs["dtype"])

        def decoders_video(encoded, **kwargs):
            fake._op = {"input": encoded, **kwargs}
            return "video"

        dali = types.ModuleType("nvidia.dali")
        dali.pipeline_def = pipeline_def
        dali.fn = types.SimpleNamespace(external_source=external_source,
                                        decoders=types.SimpleNamespace(video=decoders_video))
        dali.types = types.SimpleNamespace(UINT8="UINT8", INT32="INT32")
        self.modules = {"nvidia": types.ModuleType("nvidia"), "nvidia.dali": dali}


@pytest.fixture
def dali(monkeypatch, tmp_path):
    fake = FakeDali()
    for name, module in fake.modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(video, "dali_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # this rank's GPU (torch.cuda.set_device)
    monkeypatch.setattr(video, "probe", lambda path: VideoInfo("h264", 10.0, 12, 2, 2))
    video._dali_pipeline.cache_clear()
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(b"\x00\x01\x02\x03")
    yield fake, clip
    video._dali_pipeline.cache_clear()


def test_bare_cuda_decodes_on_the_current_device_not_gpu0(dali):
    fake, clip = dali
    fake.fail = True  # stop after the pipeline is built: the CPU cannot hold the CUDA result
    with pytest.raises(VideoDecodeError, match="DALI: RuntimeError: decoder stopped"):
        read_video(clip, backend="dali-gpu", num_frames=4, device="cuda")
    assert fake.built[-1][0]["device_id"] == 3
    assert fake.built[-1][1]["device"] == "mixed"
    with pytest.raises(VideoDecodeError):
        read_video(clip, backend="dali-gpu", num_frames=4, device="cuda:1")  # an explicit index is kept
    assert [kwargs["device_id"] for kwargs, _ in fake.built] == [3, 1]


def test_one_pipeline_per_device_with_frame_indices_as_input(dali):
    fake, clip = dali
    lists = [[0, 1, 2], [3, 5], [0, 1, 2], [7], [2, 4, 6, 8]]
    for indices in lists:
        frames = decode_dali(clip, indices, gpu=True)  # device_id None: the current device
        assert frames.shape == (len(indices), 2, 2, 3)
        assert frames[:, 0, 0, 0].tolist() == indices
    assert len(fake.built) == 1
    kwargs, op = fake.built[0]
    assert kwargs["device_id"] == 3 and op["device"] == "mixed"
    assert op["frames"] == ("external_source", "frames", "INT32")  # an input, not a constant list
    fed_frames = [data[0] for _, name, data in fake.fed if name == "frames"]
    assert [f.tolist() for f in fed_frames] == lists and all(f.dtype == np.int32 for f in fed_frames)

    decode_dali(clip, [1, 2], gpu=True, device_id=0)  # another GPU: its own pipeline
    decode_dali(clip, [1, 2], gpu=False)  # and the CPU decoder: one more
    decode_dali(clip, [4], gpu=False)
    assert [(kwargs["device_id"], op["device"]) for kwargs, op in fake.built] == [(3, "mixed"), (0, "mixed"),
                                                                                  (None, "cpu")]


def test_frames_are_handed_over_through_dlpack_without_a_copy(dali):
    fake, clip = dali
    frames = decode_dali(clip, [0, 3, 9], gpu=False)
    assert frames.data_ptr() == fake.outputs[-1].ctypes.data  # DALI's buffer itself, no copy
    assert frames[:, 0, 0, 0].tolist() == [0, 3, 9]
