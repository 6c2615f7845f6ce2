"""JSONL -> tools/preprocess_data.py logic -> megatron-core IndexedDataset (+ visual store) -> pack."""

import importlib.util
import json
import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megafusion.data.indexed import IndexedDocuments, dataset_files
from megafusion.data.packing import SequencePacker
from megafusion.data.preprocess import PreprocessConfig, PreprocessError, run_preprocess
from megafusion.data.sample import IGNORE_INDEX, IMAGE, VIDEO
from megafusion.data.tokenizer import Tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORDS = "the a red blue circle square moves left right up down on top of big small green".split()


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    rng = random.Random(0)
    (d / "c.txt").write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(300)))
    return str(train_tokenizer([d / "c.txt"], d / "tok", vocab_size=400, actions=["W", "A"]))


def megatron_dataset(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    return IndexedDataset(str(prefix))


def write_text_jsonl(path: Path, n: int, bad: dict[int, str]) -> list[dict]:
    rng = random.Random(1)
    items, lines = [], []
    for i in range(n):
        if i in bad:
            lines.append(bad[i])
            items.append(None)
            continue
        item = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30))), "title": f"doc {i} green"}
        items.append(item)
        lines.append(json.dumps(item))
    path.write_text("\n".join(lines) + "\n")
    return items


def test_text_round_trip_equals_tokenizer(tmp_path, tok_path):
    src = tmp_path / "in.jsonl"
    items = write_text_jsonl(src, 23, bad={3: "{not json", 10: json.dumps({"title": "no text"}), 11: "[1, 2]"})
    cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / "out/web"), tokenizer_model=tok_path,
                           json_keys=("text", "title"), append_eod=True, shard_size=5, progress=False)
    summary = run_preprocess(cfg)
    tok = Tokenizer(tok_path)
    good = [it for it in items if it is not None and "text" in it]
    assert summary.complete and summary.items == 23 and summary.documents == len(good) == 20
    assert summary.shards == 5
    # each bad line is reported with its file, line number and reason
    reasons = {e["line"]: e["reason"] for e in summary.errors}
    assert set(reasons) == {4, 11, 12} and "malformed JSON" in reasons[4]
    assert "missing field 'text'" in reasons[11] and "JSON object" in reasons[12]
    assert all(e["path"] == str(src) for e in summary.errors)
    assert len((tmp_path / "out/web.errors.jsonl").read_text().splitlines()) == 3
    for key in ("text", "title"):
        ds = megatron_dataset(tmp_path / f"out/web_{key}_document")
        assert len(ds) == len(good)
        for i, it in enumerate(good):
            assert ds[i].tolist() == tok.encode(it[key]) + [tok.eod_id]
    assert not (tmp_path / "out/web.shards").exists()  # merged and cleaned


def test_strict_fails_and_writes_nothing(tmp_path, tok_path):
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 8, bad={5: "{oops"})
    cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / "s"), tokenizer_model=tok_path,
                           shard_size=4, strict=True, progress=False)
    with pytest.raises(PreprocessError, match=r"in\.jsonl:6: malformed JSON"):
        run_preprocess(cfg)
    assert not list(tmp_path.glob("s_text_document*"))
    # the shard that failed left no files; the good one is kept for the next run
    assert sorted(p.name for p in (tmp_path / "s.shards").iterdir() if "done" in p.name) == ["000000.done.json"]


def load_cli():
    spec = importlib.util.spec_from_file_location("preprocess_data_cli", ROOT / "tools/preprocess_data.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_killed_run_resumes_to_identical_output(tmp_path, tok_path, capsys):
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 30, bad={7: "{x"})
    cli = load_cli()
    args = ["--input", str(src), "--tokenizer-model", tok_path, "--shard-size", "6", "--no-progress", "--append-eod"]
    assert cli.main(args + ["--output-prefix", str(tmp_path / "ref/out")]) == 0

    # a run stopped after 2 of 5 shards, plus debris of a kill: a temp file and a shard without marker
    prefix = tmp_path / "run/out"
    assert cli.main(args + ["--output-prefix", str(prefix), "--max-shards", "2"]) == 0
    assert "stopped early" in capsys.readouterr().out
    assert not Path(f"{prefix}_text_document.bin").exists()
    shards = Path(f"{prefix}.shards")
    (shards / "000002_text_document.tmp999.bin").write_bytes(b"garbage")
    (shards / "000003_text_document.bin").write_bytes(b"half written")
    (shards / "000003_text_document.idx").write_bytes(b"half written")
    done_mtime = (shards / "000000.done.json").stat().st_mtime_ns

    assert cli.main(args + ["--output-prefix", str(prefix)]) == 0
    out = capsys.readouterr().out
    assert "5 shards (2 reused)" in out and "1 skipped" in out
    for ext in ("bin", "idx"):
        assert Path(f"{prefix}_text_document.{ext}").read_bytes() == (tmp_path / f"ref/out_text_document.{ext}").read_bytes()
    assert not shards.exists() and done_mtime > 0
    # a third run finds the work complete
    assert cli.main(args + ["--output-prefix", str(prefix)]) == 0
    assert "already complete" in capsys.readouterr().out


def test_worker_processes_give_identical_output(tmp_path, tok_path):
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 40, bad={})
    outs = []
    for workers in (1, 2):
        prefix = tmp_path / f"w{workers}"
        run_preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(prefix), tokenizer_model=tok_path,
                                        shard_size=7, workers=workers, progress=False))
        outs.append(Path(f"{prefix}_text_document.bin").read_bytes() + Path(f"{prefix}_text_document.idx").read_bytes())
    assert outs[0] == outs[1]


# ----------------------------------------------------------------------------- image-text
def make_images(folder: Path, n: int, size: int) -> list[np.ndarray]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(n):
        a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(a).save(folder / f"{i}.png")
        arrays.append(a)
    return arrays


def test_image_text_survives_preprocess_load_pack(tmp_path, tok_path):
    from megafusion.vision import load_representation

    size, patch = 16, 8
    arrays = make_images(tmp_path / "img", 5, size)
    (tmp_path / "img/corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    from PIL import Image

    Image.fromarray(np.zeros((24, 40, 3), np.uint8)).save(tmp_path / "img/wide.png")  # resized + cropped
    rows = [{"image": f"img/{i}.png", "text": f"a red circle number {i}"} for i in range(5)]
    rows.insert(2, {"image": "img/corrupt.png", "text": "bad"})
    rows.insert(4, {"image": "img/missing.png", "text": "gone"})
    rows.append({"image": "img/wide.png", "text": "wide"})
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = PreprocessConfig(inputs=[str(src)], output_prefix=str(tmp_path / "out/pairs"), tokenizer_model=tok_path,
                           kind="image-text", encoder="pixel", image_size=size, patch_size=patch, shard_size=3,
                           append_eod=True, progress=False)
    summary = run_preprocess(cfg)
    assert summary.documents == 6 and summary.visuals == 6 and summary.skipped_items == 2
    bad = {e["path"]: e["reason"] for e in summary.errors}
    assert "unreadable image" in bad[str(tmp_path / "img/corrupt.png")]
    assert "not found" in bad[str(tmp_path / "img/missing.png")]

    tok = Tokenizer(tok_path)
    docs = IndexedDocuments(tmp_path / "out/pairs")
    assert len(docs) == 6 and docs.latent_dim == 3 * patch * patch and docs.meta["storage"] == "uint8"
    pixel = load_representation("pixel", image_size=size, patch_size=patch)
    for i in range(5):
        text, image, eod = docs[i]
        assert text.tokens.tolist() == tok.encode(f"a red circle number {i}")
        assert eod.tokens.tolist() == [tok.eod_id] and image.modality == IMAGE and not image.clean
        # the stored patches are exactly the pixel representation of the image (an independent patchify)
        ref = pixel.encode(torch.from_numpy(arrays[i]).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        np.testing.assert_allclose(image.latents, ref, atol=1e-6)
    assert docs[5][1].latents.shape == ((size // patch) ** 2, 3 * patch * patch)

    # pack: every image span sits between its <boi> and <eoi>, with its latents in place
    packer = SequencePacker(seq_len=64, latent_dim=docs.latent_dim, pad_id=tok.pad_id, boi_id=tok.boi_id,
                            eoi_id=tok.eoi_id)
    samples = list(packer.pack(docs[i] for i in range(len(docs))))
    seen = 0  # each document has one image, so the k-th span in packing order is document k's
    for s in samples:
        spans = [x for x in s.span_ids.unique().tolist() if x >= 0]
        for span in sorted(spans):
            where = (s.span_ids == span).nonzero().flatten()
            first, last = where.min().item(), where.max().item()
            assert last - first + 1 == len(where) == 4
            assert s.tokens[first - 1] == tok.boi_id and s.tokens[last + 1] == tok.eoi_id
            np.testing.assert_allclose(s.latents[where].numpy(), docs[seen][1].latents)
            assert s.labels[first - 1] == IGNORE_INDEX and s.labels[first - 2] == tok.boi_id
            assert s.labels[last + 1] == tok.eod_id and s.image_loss_mask[where].all()
            assert (s.modality[where] == IMAGE).all() and s.positions[first] == s.positions[first - 1] + 1
            seen += 1
    assert seen == 6


# ----------------------------------------------------------------------------- video / action video
def write_webm(path: Path, frames: np.ndarray, fps: int = 10) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libvpx-vp9", rate=fps)
        s.height, s.width = frames.shape[1:3]
        s.pix_fmt = "yuv420p"
        for img in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def test_video_and_action_video_survive_preprocess_load_pack(tmp_path, tok_path):
    from megafusion.data.video import read_video
    from megafusion.vision import load_representation

    size, patch = 16, 8
    pixel = load_representation("pixel", image_size=size, patch_size=patch)
    tok = Tokenizer(tok_path)
    frames = make_images(tmp_path / "f", 6, size)
    y, x = np.mgrid[0:24, 0:32]
    clip = np.stack([np.stack([(x * 8 + 20 * t) % 256, y * 10, np.full_like(x, 30 * t)], -1) for t in range(8)])
    write_webm(tmp_path / "clip.webm", clip.astype(np.uint8))
    (tmp_path / "broken.webm").write_bytes(b"\x1aE\xdf\xa3 not a video at all")
    fpaths = [f"f/{i}.png" for i in range(6)]

    # plain video: a video file with a caption, a frame list, a corrupt video
    rows = [{"video": "clip.webm", "text": "a moving stripe"}, {"frames": fpaths}, {"video": "broken.webm"}]
    (tmp_path / "v.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = run_preprocess(PreprocessConfig(
        inputs=[str(tmp_path / "v.jsonl")], output_prefix=str(tmp_path / "out/v"), tokenizer_model=tok_path,
        kind="video", image_size=size, patch_size=patch, max_frames=4, frame_stride=2, progress=False))
    assert summary.documents == 2 and summary.visuals == 4 + 3 and summary.skipped_items == 1
    assert summary.errors[0]["path"] == str(tmp_path / "broken.webm") and "video" in summary.errors[0]["reason"]
    docs = IndexedDocuments(tmp_path / "out/v")
    want = read_video(tmp_path / "clip.webm", num_frames=4, stride=2, size=size)  # what the reader gives
    doc = docs[0]
    assert doc[0].tokens.tolist() == tok.encode("a moving stripe")
    visual = [s for s in doc if not s.is_text]
    assert len(visual) == 4 and all(s.modality == VIDEO and not s.clean for s in visual)
    for seg, frame in zip(visual, want):
        ref = pixel.encode(frame.permute(2, 0, 1)[None].float() / 255)[0].numpy()
        np.testing.assert_allclose(seg.latents, ref, atol=1e-6)
    # between frames: exactly one <frame> separator
    assert [s.tokens.tolist() for s in doc[2::2]] == [[tok.frame_id]] * 3
    for seg, i in zip([s for s in docs[1] if not s.is_text], [0, 2, 4]):  # frame list with stride 2
        ref = pixel.encode(torch.from_numpy(frames[i]).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        np.testing.assert_allclose(seg.latents, ref, atol=1e-6)

    # action video: one action per transition, the first context frames are clean
    actions = ["W", "A", "W", "D", "S"]
    rows = [{"frames": fpaths, "actions": actions, "context_frames": 2, "text": "go"},
            {"frames": fpaths, "actions": actions[:3]},  # wrong count
            {"video": "clip.webm", "actions": ["W"] * 7}]  # default context frames (3 here)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    summary = run_preprocess(PreprocessConfig(
        inputs=[str(tmp_path / "a.jsonl")], output_prefix=str(tmp_path / "out/a"), tokenizer_model=tok_path,
        kind="action-video", image_size=size, patch_size=patch, context_frames=3, progress=False))
    assert summary.documents == 2 and summary.skipped_items == 1
    assert "3 actions for 6 frames" in summary.errors[0]["reason"]
    docs = IndexedDocuments(tmp_path / "out/a")
    doc = docs[0]
    assert [s.clean for s in doc if not s.is_text] == [True, True, False, False, False, False]
    texts = [s.tokens.tolist() for s in doc if s.is_text]
    assert texts[0] == tok.encode("go")
    # after frame k: the tokens of action k, then <frame>; after the last frame nothing
    assert texts[1:] == [tok.encode_action(a) + [tok.frame_id] for a in actions]
    assert tok.encode_action("W") == [tok.action_ids()["W"]] and len(tok.encode_action("D")) >= 1
    assert [s.clean for s in docs[1] if not s.is_text] == [True] * 3 + [False] * 5

    # packed: the clean frames get no flow-matching loss; action tokens predict the next marker
    t = (size // patch) ** 2
    packer = SequencePacker(seq_len=128, latent_dim=docs.latent_dim, pad_id=tok.pad_id, boi_id=tok.boi_id,
                            eoi_id=tok.eoi_id)
    s = next(packer.pack([docs[0]]))
    spans = s.span_ids[s.span_ids >= 0]
    assert spans.unique().tolist() == list(range(6)) and (torch.bincount(spans) == t).all()
    for span in range(6):
        where = s.span_ids == span
        assert s.clean_spans[where].all() == (span < 2) and s.image_loss_mask[where].all() == (span >= 2)
        assert (s.modality[where] == VIDEO).all()
    eoi0 = (s.span_ids == 0).nonzero().max().item() + 1
    assert s.tokens[eoi0 + 1] == tok.action_ids()["W"] and s.labels[eoi0] == tok.action_ids()["W"]
    assert s.labels[eoi0 + 1] == tok.frame_id and s.labels[eoi0 + 2] == tok.boi_id


def test_webdataset_tar_and_folder_inputs(tmp_path, tok_path):
    import tarfile

    size, patch = 16, 8
    arrays = make_images(tmp_path / "src", 4, size)
    folder = tmp_path / "folder"
    folder.mkdir()
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for i in range(4):
            png = (tmp_path / f"src/{i}.png").read_bytes()
            caption = f"a blue square number {i}".encode()
            if i == 2:
                png = b"corrupt bytes"
            for name, data in [(f"s{i}.png", png), (f"s{i}.txt", caption)]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, __import__("io").BytesIO(data))
                (folder / name).write_bytes(data)
    (folder / "s4.txt").write_text("a caption without an image")
    tok = Tokenizer(tok_path)
    for src in (tar_path, folder):
        prefix = tmp_path / f"out/{src.name}"
        summary = run_preprocess(PreprocessConfig(inputs=[str(src)], output_prefix=str(prefix), kind="image-text",
                                                  tokenizer_model=tok_path, image_size=size, patch_size=patch,
                                                  shard_size=2, progress=False))
        assert summary.documents == 3, summary.errors
        reasons = " ".join(e["reason"] for e in summary.errors)
        assert "unreadable image" in reasons and any("s2.png" in e["path"] for e in summary.errors)
        docs = IndexedDocuments(prefix)
        for doc, i in zip((docs[j] for j in range(3)), [0, 1, 3]):
            assert doc[0].tokens.tolist() == tok.encode(f"a blue square number {i}")
            expect = arrays[i].reshape(2, patch, 2, patch, 3).transpose(0, 2, 1, 3, 4).reshape(4, -1) / 127.5 - 1
            np.testing.assert_allclose(doc[1].latents, expect, atol=1e-6)

    # a folder's caption edited in place (same size): its shard of the three is made again
    (folder / "s0.txt").write_text("a blue square number 9")
    summary = run_preprocess(PreprocessConfig(inputs=[str(folder)], output_prefix=str(tmp_path / "out/folder"),
                                              kind="image-text", tokenizer_model=tok_path, image_size=size,
                                              patch_size=patch, shard_size=2, progress=False))
    assert summary.shards == 3 and summary.shards_reused == 2
    assert IndexedDocuments(tmp_path / "out/folder")[0][0].tokens.tolist() == tok.encode("a blue square number 9")


def test_no_documents_is_an_error_not_an_empty_dataset(tmp_path, tok_path):
    (tmp_path / "bad.jsonl").write_text("{x\n[]\n")
    with pytest.raises(PreprocessError, match="no documents: 2 items read, 2 skipped"):
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "bad.jsonl")], output_prefix=str(tmp_path / "o"),
                                        tokenizer_model=tok_path, progress=False))
    assert not list(tmp_path.glob("o_text_document.*"))
    assert len((tmp_path / "o.errors.jsonl").read_text().splitlines()) == 2  # the reasons the message points to


def test_representation_encoder_latents_stored_as_float16(tmp_path, tok_path, monkeypatch):
    """--encoder rae/vae calls megafusion.vision.load_representation; here it is handed the pixel
    representation (a real Representation), so the float16 store can be checked exactly."""
    import megafusion.vision as vision

    size, patch = 16, 4
    calls = []
    real_load = vision.load_representation

    def fake_load(kind, path=None, **kw):
        calls.append((kind, path))
        return real_load("pixel", image_size=size, patch_size=patch)

    monkeypatch.setattr(vision, "load_representation", fake_load)
    arrays = make_images(tmp_path / "img", 3, size)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"image": f"img/{i}.png", "text": "x"}) for i in range(3)))
    run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "p.jsonl")], output_prefix=str(tmp_path / "o"),
                                    tokenizer_model=tok_path, kind="image-text", encoder="rae",
                                    encoder_path="some/dir", image_size=size, progress=False))
    assert calls == [("rae", "some/dir")]
    docs = IndexedDocuments(tmp_path / "o")
    assert docs.meta["storage"] == "float16" and docs.latent_dim == 3 * patch * patch
    rep = real_load("pixel", image_size=size, patch_size=patch)
    for i in range(3):
        ref = rep.encode(torch.from_numpy(arrays[i]).permute(2, 0, 1)[None].float() / 255)[0].numpy()
        np.testing.assert_allclose(docs[i][1].latents, ref.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    # a representation of another image size is refused with the size to use
    with pytest.raises(PreprocessError, match="--image-size 16"):
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "p.jsonl")], output_prefix=str(tmp_path / "o2"),
                                        tokenizer_model=tok_path, kind="image-text", encoder="vae", image_size=32,
                                        progress=False))


def test_image_first_fraction_and_joined_fields(tmp_path, tok_path):
    make_images(tmp_path / "img", 1, 16)
    rows = [{"image": "img/0.png", "question": f"what is {i}", "answer": "red"} for i in range(40)]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = Tokenizer(tok_path)
    orders = []
    for run in range(2):
        run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "vqa.jsonl")], output_prefix=str(tmp_path / f"o{run}"),
                                        tokenizer_model=tok_path, kind="image-text", json_keys=("question", "answer"),
                                        image_first=0.5, image_size=16, progress=False))
        docs = IndexedDocuments(tmp_path / f"o{run}")
        orders.append([not docs[i][0].is_text for i in range(40)])
        for i in range(40):
            text = [s for s in docs[i] if s.is_text][0].tokens.tolist()
            assert text == tok.encode(f"what is {i}") + tok.encode("red")
    assert orders[0] == orders[1]  # deterministic
    assert 10 <= sum(orders[0]) <= 30  # about half image-first


def test_memory_stays_bounded_by_the_shard_not_the_input(tmp_path, tok_path):
    import tracemalloc

    rng = random.Random(2)
    line = json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(200))})  # ~1 KB
    with open(tmp_path / "big.jsonl", "w") as f:
        for _ in range(1500):
            f.write(line + "\n")
    size = (tmp_path / "big.jsonl").stat().st_size
    import megatron.core.datasets.indexed_dataset  # noqa: F401  (its import is not what is measured)

    tracemalloc.start()
    try:
        summary = run_preprocess(PreprocessConfig(inputs=[str(tmp_path / "big.jsonl")], output_prefix=str(tmp_path / "o"),
                                                  tokenizer_model=tok_path, shard_size=100, progress=False))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary.documents == 1500
    assert peak < size / 4, f"peak Python memory {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB input"


# ----------------------------------------------------------------------------- content-addressed re-runs
def run_cli(args, capsys) -> tuple[int, str, str]:
    rc = load_cli().main(args + ["--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


def dataset_bytes(prefix) -> bytes:
    return b"".join(Path(f"{prefix}.{ext}").read_bytes() for ext in ("bin", "idx"))


def test_edited_input_of_the_same_size_rebuilds_only_its_shard(tmp_path, tok_path, capsys):
    src = tmp_path / "in.jsonl"
    rows = [{"text": f"the red circle moves left {i}"} for i in range(9)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["--input", str(src), "--tokenizer-model", tok_path, "--shard-size", "3", "--append-eod"]
    prefix = tmp_path / "out/web"
    assert run_cli(args + ["--output-prefix", str(prefix)], capsys)[0] == 0
    size = src.stat().st_size

    # line 5 (the second shard): "red" -> "big", the file keeps its byte size
    rows[4]["text"] = "the big circle moves left 4"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert src.stat().st_size == size
    rc, out, _ = run_cli(args + ["--output-prefix", str(prefix)], capsys)
    assert rc == 0 and "nothing to do" not in out
    assert "3 shards (2 reused)" in out  # the first and third shards were copied, not re-tokenized
    tok = Tokenizer(tok_path)
    ds = megatron_dataset(f"{prefix}_text_document")
    assert ds[4].tolist() == tok.encode("the big circle moves left 4") + [tok.eod_id]
    # the reused shards' documents are exactly what a fresh run writes
    assert run_cli(args + ["--output-prefix", str(tmp_path / "fresh/web")], capsys)[0] == 0
    assert dataset_bytes(f"{prefix}_text_document") == dataset_bytes(tmp_path / "fresh/web_text_document")

    # unchanged: nothing to do, the output is not touched
    mtime = Path(f"{prefix}_text_document.bin").stat().st_mtime_ns
    rc, out, _ = run_cli(args + ["--output-prefix", str(prefix)], capsys)
    assert rc == 0 and "already complete" in out and "nothing to do" in out
    assert Path(f"{prefix}_text_document.bin").stat().st_mtime_ns == mtime


def test_an_edit_during_an_unfinished_run_rebuilds_the_finished_shard(tmp_path, tok_path, capsys):
    """A shard finished before a stop (--max-shards, or a kill) whose input then changes is
    made again, not merged stale."""
    src = tmp_path / "in.jsonl"
    rows = [{"text": f"a red square {i}"} for i in range(4)]
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    args = ["--input", str(src), "--tokenizer-model", tok_path, "--shard-size", "2",
            "--output-prefix", str(tmp_path / "o")]
    assert run_cli(args + ["--max-shards", "1"], capsys)[0] == 0
    rows[0]["text"] = "a big square 0"  # same size
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "2 shards (0 reused)" in out
    ds = megatron_dataset(tmp_path / "o_text_document")
    assert ds[0].tolist() == Tokenizer(tok_path).encode("a big square 0")


def test_an_image_missing_at_first_is_included_once_it_exists(tmp_path, tok_path, capsys):
    size, patch = 16, 8
    arrays = make_images(tmp_path / "img", 4, size)
    late = tmp_path / "img/3.png"
    late.rename(tmp_path / "later.png")
    (tmp_path / "img/1.png").write_bytes(b"\x89PNG\r\n\x1a\n corrupt")
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"image": f"img/{i}.png", "text": f"shape {i}"}) for i in range(4)) + "\n")
    args = ["--input", str(src), "--tokenizer-model", tok_path, "--kind", "image-text", "--image-size", str(size),
            "--patch-size", str(patch), "--shard-size", "2", "--output-prefix", str(tmp_path / "o")]
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "2 skipped" in out
    # each skipped item is listed with its file, and the way to get it in
    assert f"unreadable image" in out and str(tmp_path / "img/1.png") in out
    assert "image file not found" in out and str(late) in out and "re-run" in out
    assert len(IndexedDocuments(tmp_path / "o")) == 2

    (tmp_path / "later.png").rename(late)  # the missing image appears
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "nothing to do" not in out and "1 skipped" in out and "2 shards (1 reused)" in out
    docs = IndexedDocuments(tmp_path / "o")
    assert len(docs) == 3
    expect = arrays[3].reshape(2, patch, 2, patch, 3).transpose(0, 2, 1, 3, 4).reshape(4, -1) / 127.5 - 1
    np.testing.assert_allclose(docs[2][1].latents, expect, atol=1e-6)

    # an image whose pixels change (a JSONL that does not change at all) is encoded again
    from PIL import Image

    Image.fromarray(255 - arrays[0]).save(tmp_path / "img/0.png")
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "2 shards (1 reused)" in out
    expect = (255 - arrays[0]).reshape(2, patch, 2, patch, 3).transpose(0, 2, 1, 3, 4).reshape(4, -1) / 127.5 - 1
    np.testing.assert_allclose(IndexedDocuments(tmp_path / "o")[0][1].latents, expect, atol=1e-6)
    assert "nothing to do" in run_cli(args, capsys)[1]
    # the shards copied from the earlier output hold what a fresh run (in worker processes) writes
    fresh = [a if a != str(tmp_path / "o") else str(tmp_path / "fresh") for a in args]
    assert run_cli(fresh + ["--workers", "2"], capsys)[0] == 0
    for name in dataset_files("o", multimodal=True):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("o", "fresh", 1)).read_bytes(), name


def test_a_different_tokenizer_at_the_same_path_rebuilds(tmp_path, tok_path, capsys):
    import shutil

    other = train_tokenizer([Path(tok_path).with_name("c.txt")], tmp_path / "other", vocab_size=300)
    tok_file = tmp_path / "tok.model"
    shutil.copy(tok_path, tok_file)
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 6, bad={})
    args = ["--input", str(src), "--tokenizer-model", str(tok_file), "--output-prefix", str(tmp_path / "o")]
    assert run_cli(args, capsys)[0] == 0
    # replaced as a new file: overwriting it in place would corrupt the sentencepiece model this
    # process still holds (it crashed the interpreter), which a separate run never sees
    shutil.copy(other, tmp_path / "new.model")
    os.replace(tmp_path / "new.model", tok_file)
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "nothing to do" not in out and "(0 reused)" in out
    first = json.loads(src.read_text().splitlines()[0])["text"]
    ds = megatron_dataset(tmp_path / "o_text_document")  # kept alive: ds[0] is a view of its memory map
    assert ds[0].tolist() == Tokenizer(other).encode(first)


def test_a_changed_encoder_rebuilds(tmp_path, tok_path, monkeypatch, capsys):
    """The encoder's identity is the bytes of its files, not its path."""
    import megafusion.vision as vision

    real_load = vision.load_representation
    monkeypatch.setattr(vision, "load_representation",
                        lambda kind, path=None, **kw: real_load("pixel", image_size=16, patch_size=8))
    make_images(tmp_path / "img", 2, 16)
    (tmp_path / "p.jsonl").write_text("\n".join(json.dumps({"image": f"img/{i}.png", "text": "x"}) for i in range(2)))
    rep = tmp_path / "rep"
    rep.mkdir()
    (rep / "weights.bin").write_bytes(b"version 1")
    args = ["--input", str(tmp_path / "p.jsonl"), "--tokenizer-model", tok_path, "--kind", "image-text",
            "--encoder", "rae", "--encoder-path", str(rep), "--image-size", "16", "--shard-size", "1",
            "--output-prefix", str(tmp_path / "o")]
    assert run_cli(args, capsys)[0] == 0
    assert "nothing to do" in run_cli(args, capsys)[1]
    (rep / "weights.bin").write_bytes(b"version 2")
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "nothing to do" not in out and "2 shards (0 reused)" in out
    # float16 latents copied from the output for the unchanged shard are stored bit for bit
    from PIL import Image

    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "img/1.png")
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "2 shards (1 reused)" in out
    assert run_cli([a if a != str(tmp_path / "o") else str(tmp_path / "fresh") for a in args], capsys)[0] == 0
    assert IndexedDocuments(tmp_path / "o").meta["storage"] == "float16"
    for name in dataset_files("o", multimodal=True):
        assert (tmp_path / name).read_bytes() == (tmp_path / name.replace("o", "fresh", 1)).read_bytes(), name


def test_a_deleted_output_is_made_again(tmp_path, tok_path, capsys):
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 4, bad={})
    args = ["--input", str(src), "--tokenizer-model", tok_path, "--output-prefix", str(tmp_path / "o")]
    assert run_cli(args, capsys)[0] == 0
    Path(tmp_path / "o_text_document.bin").unlink()
    rc, out, _ = run_cli(args, capsys)
    assert rc == 0 and "nothing to do" not in out and (tmp_path / "o_text_document.bin").is_file()


def test_each_file_is_hashed_once_per_run(tmp_path, tok_path, monkeypatch):
    import megafusion.data.preprocess.digests as digests

    make_images(tmp_path / "img", 1, 16)
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps({"image": "img/0.png", "text": "q"}) for _ in range(30)))
    hashed = []
    real = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda path: hashed.append(str(path)) or real(path))
    time.sleep(2 * digests.RACY_NS / 1e9)  # files changed just now are hashed at every use
    cfg = PreprocessConfig(inputs=[str(tmp_path / "q.jsonl")], output_prefix=str(tmp_path / "o"),
                           tokenizer_model=tok_path, kind="image-text", image_size=16, shard_size=7, progress=False)
    run_preprocess(cfg)
    assert sorted(hashed) == sorted([tok_path, str(tmp_path / "img/0.png")])


def test_a_file_rewritten_within_one_process_gets_a_new_digest(tmp_path, monkeypatch):
    """The digest cache keys on a file's stat, not its path alone: a changed file is never
    taken for the unchanged one, whether or not a run starts (clear_digests) in between."""
    import megafusion.data.preprocess.digests as digests

    hashed = []
    real = digests._hash_file
    monkeypatch.setattr(digests, "_hash_file", lambda path: hashed.append(str(path)) or real(path))
    f = tmp_path / "weights.bin"
    # rewritten at once, same size: within the file system's timestamp tick, so not cached
    f.write_bytes(b"version 1")
    first = digests.file_digest(f)
    f.write_bytes(b"version 2")
    second = digests.file_digest(f)
    assert first != second == digests.file_digest(f) == digests.file_digest(str(f))
    assert len(hashed) == 4

    # once it is older than that, it is hashed once ...
    time.sleep(2 * digests.RACY_NS / 1e9)
    hashed.clear()
    assert [digests.file_digest(f) for _ in range(3)] == [second] * 3 and len(hashed) == 1
    # ... until it changes: same size, mtime set back (as tar or rsync -t do) -> new ctime
    old = f.stat()
    monkeypatch.setattr(digests, "RACY_NS", 0)  # the stat key alone must tell
    time.sleep(0.05)  # past a coarse timestamp tick
    f.write_bytes(b"version 3")
    os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert f.stat().st_size == old.st_size and f.stat().st_mtime_ns == old.st_mtime_ns
    third = digests.file_digest(f)
    assert third == digests._hash_file(f) != second
    # replaced by another file (a new inode) of the same size and mtime
    time.sleep(0.05)
    g = tmp_path / "new.bin"
    g.write_bytes(b"version 4")
    os.utime(g, ns=(old.st_atime_ns, old.st_mtime_ns))
    os.replace(g, f)
    assert digests.file_digest(f) == digests._hash_file(f) != third
    # deleted, then back
    f.unlink()
    assert digests.file_digest(f) == "missing"
    f.write_bytes(b"version 1")
    assert digests.file_digest(f) == first

# ----------------------------------------------------------------------------- refused up front
@pytest.mark.parametrize("case", ["missing", "directory", "not a model"])
def test_a_bad_tokenizer_is_one_line_exit_2(tmp_path, tok_path, capsys, case):
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 2, bad={})
    tok = {"missing": tmp_path / "nope.model", "directory": tmp_path, "not a model": tmp_path / "junk.model"}[case]
    (tmp_path / "junk.model").write_bytes(b"this is not a sentencepiece model")
    rc, out, err = run_cli(["--input", str(src), "--tokenizer-model", str(tok),
                            "--output-prefix", str(tmp_path / "out/o")], capsys)
    lines = [line for line in err.splitlines() if line.startswith("preprocess_data: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(tok) in lines[0] and "tools/train_tokenizer.py" in lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("case", ["parent is a file", "prefix is a directory"])
def test_a_bad_output_prefix_is_one_line_exit_2(tmp_path, tok_path, capsys, case):
    src = tmp_path / "in.jsonl"
    write_text_jsonl(src, 2, bad={})
    (tmp_path / "afile").write_text("keep me")
    (tmp_path / "adir").mkdir()
    prefix = tmp_path / ("afile/o" if case == "parent is a file" else "adir")
    rc, out, err = run_cli(["--input", str(src), "--tokenizer-model", tok_path, "--output-prefix", str(prefix)], capsys)
    lines = [line for line in err.splitlines() if line.startswith("preprocess_data: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert str(prefix.parent if case == "parent is a file" else prefix) in lines[0] and "--output-prefix" in lines[0]
    assert (tmp_path / "afile").read_text() == "keep me" and not list((tmp_path / "adir").iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adir", "afile", "in.jsonl"]


def test_corrupt_caption_images_are_skipped_and_listed_or_refused_under_strict(tmp_path, tok_path, capsys):
    make_images(tmp_path / "img", 2, 16)
    (tmp_path / "img/1.png").write_bytes((tmp_path / "img/1.png").read_bytes()[:40])  # truncated
    src = tmp_path / "pairs.jsonl"
    src.write_text("\n".join(json.dumps({"image": f"img/{i}.png", "text": "x"}) for i in range(2)) + "\n")
    args = ["--input", str(src), "--tokenizer-model", tok_path, "--kind", "image-text", "--image-size", "16"]
    rc, out, err = run_cli(args + ["--output-prefix", str(tmp_path / "o")], capsys)
    assert rc == 0 and "1 skipped" in out and "Traceback" not in err
    assert [line for line in out.splitlines() if f"skipped {src}:2: unreadable image" in line and str(tmp_path / "img/1.png") in line]
    assert len(IndexedDocuments(tmp_path / "o")) == 1

    rc, out, err = run_cli(args + ["--output-prefix", str(tmp_path / "s"), "--strict"], capsys)
    lines = [line for line in err.splitlines() if line.startswith("preprocess_data: error:")]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in err
    assert "pairs.jsonl:2: unreadable image" in lines[0] and "img/1.png" in lines[0] and "--strict" in lines[0]


# ----------------------------------------------------------------------------- the parts, and what they share with vision
def test_pixel_encoder_patches_are_vision_patchify_and_invert():
    from megafusion.data.preprocess.encoders import PixelEncoder
    from megafusion.vision.base import patchify, unpatchify

    images = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    encoded = PixelEncoder(4).encode(images)
    assert [grid for _, grid in encoded] == [(2, 3), (2, 3)]
    ref = patchify(torch.from_numpy(images).permute(0, 3, 1, 2), 4).numpy()
    for i, (patches, _) in enumerate(encoded):
        assert patches.dtype == np.uint8 and patches.shape == (6, 48) and np.array_equal(patches, ref[i])
        back = unpatchify(torch.from_numpy(patches)[None], 4, 3, grid=(2, 3))[0].permute(1, 2, 0).numpy()
        assert np.array_equal(back, images[i])


def test_load_image_is_vision_load_image_with_item_errors(tmp_path):
    from PIL import Image

    from megafusion.data.preprocess import IMAGE_EXTS, ItemError, load_image
    from megafusion.vision.images import IMAGE_SUFFIXES
    from megafusion.vision.images import load_image as vision_load_image

    Image.fromarray(np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    image = load_image(tmp_path / "a.png", 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    assert np.array_equal(image, vision_load_image(tmp_path / "a.png", 16))
    with pytest.raises(ItemError, match="image file not found"):
        load_image(tmp_path / "missing.png", 16)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ItemError, match="unreadable image") as err:
        load_image(tmp_path / "bad.png", 16)
    assert err.value.path == str(tmp_path / "bad.png")
    assert set(IMAGE_EXTS) == {*IMAGE_SUFFIXES, ".gif"}


def test_the_command_and_public_names_stay_at_megafusion_data_preprocess():
    import importlib

    import megafusion.data.preprocess as pre
    from megafusion.cli import COMMANDS

    assert importlib.import_module(COMMANDS["preprocess-data"][0]).main is pre.main
    assert load_cli().main is pre.main
    for name in ("PreprocessConfig", "PreprocessError", "PreprocessSummary", "run_preprocess", "build_parser"):
        assert getattr(pre, name).__module__.startswith("megafusion.data.preprocess.")
