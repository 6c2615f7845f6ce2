"""data.kind = energon: WebDataset shards prepared with Energon's own API train the Transfusion
model (both losses fall), a corrupt image is skipped and counted, and a resumed run reads
exactly the samples of an uninterrupted one; the same for interleaved text and images
(``InterleavedSample``), each image of a document its own span.

The datasets are written here: tar shards of KEY.png + KEY.txt (32x32 coloured squares and
their captions), one of them with a truncated PNG, prepared with
``BaseWebdatasetFactory.prepare_dataset`` (what ``energon prepare`` runs) and a
``.nv-meta/dataset.yaml`` for ``CaptioningSample`` with the field map png/txt; and an
interleaved one: KEY.0.txt KEY.1.png [KEY.2.txt KEY.3.png] per sample, ``InterleavedSample``
with a ``sample_loader`` that orders the parts into its ``sequence``.
"""

import io
import random
import tarfile

import numpy as np
import pytest
import yaml

from conftest import losses_by_step, read_metrics, run_train

pytest.importorskip("megatron.energon")

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
SHAPES = ("square", "bar")
CORRUPT_KEY = "s000005"
# tiny_transfusion.yaml's ShapesWorld settings back to their defaults: energon data never reads
# them, and validate refuses what a run would ignore
BASE = ["data.kind=energon", "data.shapes_weights={text: 1.0, image_text: 1.0, video: 0.0, action_video: 0.0}",
        "data.shapes_holdout=none", "logging.tensorboard=false", "train.global_batch_size=4",
        "train.micro_batch_size=2"]


def png(colour: str, shape: str, rng: random.Random) -> bytes:
    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    x, y = rng.randrange(0, 16), rng.randrange(0, 16)
    h, w = (8, 8) if shape == "square" else (4, 16)
    img[y:y + h, x:x + w] = COLOURS[colour]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_energon_dataset(root, samples: int = 48, shards: int = 2):
    """Tar shards of PNG + caption, prepared for Energon (CaptioningSample)."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    rng = random.Random(0)
    root.mkdir(parents=True)
    per = samples // shards
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                colour, shape = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
                key = f"s{i:06d}"
                image = png(colour, shape, rng)
                if key == CORRUPT_KEY:
                    image = image[:40]  # a truncated PNG
                for name, payload in ((f"{key}.png", image), (f"{key}.txt", f"a {colour} {shape}".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    BaseWebdatasetFactory.prepare_dataset(EPath(root), sorted(p.name for p in root.glob("*.tar")),
                                          split_parts_ratio=[("train", 1.0)], workers=1)
    (root / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump({
        "sample_type": {"__module__": "megatron.energon", "__class__": "CaptioningSample"},
        "field_map": {"image": "png", "caption": "txt"}}))
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_energon_dataset(tmp_path_factory.mktemp("energon") / "pairs")


INTERLEAVED_CORRUPT_KEY = "s000007"  # its second image is a truncated PNG: the whole sample is skipped
SAMPLE_LOADER = '''
def sample_loader(raw: dict) -> dict:
    parts = sorted((k for k in raw if not k.startswith("__")), key=lambda k: int(k.split(".", 1)[0]))
    return dict(sequence=[raw[k].decode("utf-8") if k.endswith(".txt") else raw[k] for k in parts])


def part_filter(part: str) -> bool:
    return part.rsplit(".", 1)[-1] in ("txt", "png")
'''


def interleaved_pieces(i: int) -> list[tuple[str, str]]:
    """Sample ``i``'s sequence as (kind, what): text pieces and (colour, shape) images; odd
    samples hold two images, even ones one."""
    c1, s1 = list(COLOURS)[i % 3], SHAPES[(i // 3) % 2]
    pieces = [("text", f"a {c1} {s1}"), ("image", (c1, s1))]
    if i % 2:
        c2, s2 = list(COLOURS)[(i + 1) % 3], SHAPES[(i // 3 + 1) % 2]
        pieces += [("text", f"then a {c2} {s2}"), ("image", (c2, s2))]
    return pieces


def write_interleaved_dataset(root, samples: int = 48, shards: int = 2):
    """Tar shards of KEY.<n>.txt / KEY.<n>.png parts, prepared for Energon (InterleavedSample,
    the sequence built by a sample_loader)."""
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    rng = random.Random(1)
    root.mkdir(parents=True)
    per = samples // shards
    for s in range(shards):
        with tarfile.open(root / f"shard-{s:04d}.tar", "w") as tar:
            for i in range(s * per, (s + 1) * per):
                key = f"s{i:06d}"
                for n, (kind, what) in enumerate(interleaved_pieces(i)):
                    if kind == "text":
                        name, payload = f"{key}.{n}.txt", what.encode()
                    else:
                        name, payload = f"{key}.{n}.png", png(*what, rng)
                        if key == INTERLEAVED_CORRUPT_KEY and n == 3:
                            payload = payload[:40]
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    BaseWebdatasetFactory.prepare_dataset(EPath(root), sorted(p.name for p in root.glob("*.tar")),
                                          split_parts_ratio=[("train", 1.0)], workers=1)
    (root / ".nv-meta" / "sample_loader.py").write_text(SAMPLE_LOADER)
    (root / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump({
        "sample_type": {"__module__": "megatron.energon", "__class__": "InterleavedSample"},
        "sample_loader": "sample_loader.py:sample_loader", "part_filter": "sample_loader.py:part_filter"}))
    return root


@pytest.fixture(scope="module")
def interleaved(tmp_path_factory):
    return write_interleaved_dataset(tmp_path_factory.mktemp("energon") / "interleaved")


def test_energon_training_losses_fall_and_corrupt_sample_is_counted(dataset, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, "tiny_transfusion.yaml", BASE + [f"data.paths=[{dataset}]", "train.steps=30",
                                                           "data.num_workers=1"])
    metrics = read_metrics(run)
    text, image = losses_by_step(run, "loss_text"), losses_by_step(run, "loss_image")
    assert sorted(text) == list(range(1, 31)), proc.stdout[-2000:]
    first, last = np.mean([text[s] for s in (1, 2, 3)]), np.mean([text[s] for s in (28, 29, 30)])
    assert last < 0.5 * first, (first, last)
    first, last = np.mean([image[s] for s in (1, 2, 3)]), np.mean([image[s] for s in (28, 29, 30)])
    assert last < 0.8 * first, (first, last)
    # 30 steps x 4 sequences of ~5 documents pass the 48-sample dataset more than once: the
    # corrupt PNG is met, skipped (never fatal) and counted, and the count never decreases.
    skipped = [m["data_skipped_samples"] for m in metrics]
    assert skipped[-1] >= 1 and skipped == sorted(skipped)


def test_energon_resume_equals_an_uninterrupted_run(dataset, tmp_path):
    from megatron.core import dist_checkpointing

    from megafusion.training.checkpoint import complete_checkpoints

    common = BASE + [f"data.paths=[{dataset}]", "checkpoint.every=3", "schedule.decay_steps=6",
                     "data.num_workers=0"]
    uninterrupted = tmp_path / "a"
    run_train(uninterrupted, "tiny_transfusion.yaml", common + ["train.steps=6"])
    run = tmp_path / "b"
    run_train(run, "tiny_transfusion.yaml", common + ["train.steps=3"])
    [(step, path)] = complete_checkpoints(run)
    data = dist_checkpointing.load_common_state_dict(str(path))["common"]["data"]
    assert step == 3 and len(data["stream_states"]) == 1  # one data-parallel rank's Energon state
    proc = run_train(run, "tiny_transfusion.yaml", common + ["train.steps=6"])
    assert "resumed from step 3" in proc.stdout
    for key in ("loss", "loss_text", "loss_image"):
        want, got = losses_by_step(uninterrupted, key), losses_by_step(run, key)
        assert sorted(got) == list(range(1, 7))
        for s in range(1, 7):  # exact: the same samples in the same sequences after the restart
            assert got[s] == want[s], f"{key} step {s}: {got[s]} != {want[s]}"


def test_energon_refuses_unsupported_sample_types_and_unknown_paths(dataset, tmp_path):
    from megafusion.config import Config, ConfigError, validate

    other = tmp_path / "vqa"
    (other / ".nv-meta").mkdir(parents=True)
    (other / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump(
        {"sample_type": {"__module__": "megatron.energon", "__class__": "VidQASample"}}))
    cfg = Config()
    cfg.model.kind, cfg.data.kind, cfg.data.paths = "transfusion", "energon", [str(other), str(tmp_path / "nothing")]
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert "VidQASample" in str(err.value) and "not supported" in str(err.value)
    # the message names what is read
    assert "CaptioningSample" in str(err.value) and "InterleavedSample" in str(err.value)
    assert "neither an Energon-prepared dataset" in str(err.value)
    # an interleaved dataset whose sequence a field_map would have to make (it cannot) is refused
    field_mapped = tmp_path / "interleaved_field_map"
    (field_mapped / ".nv-meta").mkdir(parents=True)
    (field_mapped / ".nv-meta" / "dataset.yaml").write_text(yaml.safe_dump(
        {"sample_type": {"__module__": "megatron.energon", "__class__": "InterleavedSample"},
         "field_map": {"sequence": "txt"}}))
    cfg.data.paths = [str(field_mapped)]
    with pytest.raises(ConfigError, match="InterleavedSample dataset without a sample_loader"):
        validate(cfg, 1)
    cfg.model.kind, cfg.data.paths = "text", [str(dataset)]
    with pytest.raises(ConfigError, match="model.kind = text reads text only"):
        validate(cfg, 1)


def test_energon_blends_with_an_indexed_dataset_by_weight(dataset, tmp_path):
    """An Energon dataset and an indexed text dataset, weights 3 : 1: documents are drawn in
    that proportion (Megatron's furthest-behind rule), read from both, and packed."""
    from megafusion.config import Config
    from megafusion.data.byte_tokenizer import ByteTokenizer
    from megafusion.data.energon_stream import EnergonStream
    from megafusion.data.indexed import DatasetWriter
    from megafusion.data.sample import IMAGE

    tok = ByteTokenizer()
    prefix = tmp_path / "text_document"
    writer = DatasetWriter(prefix, vocab_size=272)
    for i in range(20):
        writer.add_document(np.asarray(tok.encode(f"plain text number {i} .") + [tok.eod_id], dtype=np.int64))
    writer.finalize()

    cfg = Config()
    cfg.model.kind, cfg.model.seq_length = "transfusion", 256
    cfg.vision.representation, cfg.vision.image_size, cfg.vision.patch_size = "pixel", 32, 8
    cfg.data.kind, cfg.data.paths, cfg.data.weights, cfg.data.num_workers = "energon", [str(dataset), str(prefix)], \
        [3.0, 1.0], 0
    stream = EnergonStream.from_config(cfg)
    stream.bind(0, 1)
    samples = [stream.sample(i) for i in range(6)]
    images = sum(int(((s.modality == IMAGE).long().diff(prepend=s.modality[:1] * 0) == 1).sum()) for s in samples)
    texts = sum(tok.decode(s.tokens[s.modality == 0].tolist()).count("plain text") for s in samples)
    drawn = stream.slot - (1 if stream.pending is not None else 0)  # documents packed or skipped
    assert images > 0 and texts > 0
    assert abs(texts - drawn / 4) <= 1.5, (texts, images, drawn)
    assert abs(images + stream.skipped - 3 * drawn / 4) <= 1.5, (texts, images, drawn)


def _interleaved_cfg(paths):
    from megafusion.config import Config

    cfg = Config()
    cfg.model.kind, cfg.model.seq_length = "transfusion", 256
    cfg.vision.representation, cfg.vision.image_size, cfg.vision.patch_size = "pixel", 32, 8
    cfg.data.kind, cfg.data.paths, cfg.data.num_workers = "energon", [str(p) for p in paths], 0
    return cfg


def test_energon_interleaved_document_has_each_image_as_its_own_span(interleaved):
    """Packed sequences of an InterleavedSample dataset: each document is its sequence in
    order, ``text <boi> image <eoi> text <boi> image <eoi> <eod>``; each image its own span
    (16 latent positions of modality IMAGE between its markers); the sample with a truncated
    PNG is skipped whole and counted."""
    from megafusion.config import validate
    from megafusion.data.energon_stream import EnergonStream
    from megafusion.data.sample import IMAGE, TEXT

    cfg = _interleaved_cfg([interleaved])
    validate(cfg, 1)  # an InterleavedSample dataset with a sample_loader is accepted
    stream = EnergonStream.from_config(cfg)
    stream.bind(0, 1)
    tok = stream.tokenizer
    captions = {" ".join(t for k, t in interleaved_pieces(i) if k == "text"): i for i in range(48)}
    seen_two = 0
    for _ in range(16):  # ~5 documents a sequence: the 48 samples are all met
        sample = stream.sample()
        for d in sample.doc_ids.unique().tolist():
            at = (sample.doc_ids == d).nonzero().flatten()
            tokens, modality, spans = sample.tokens[at], sample.modality[at], sample.span_ids[at]
            if (tokens == tok.pad_id).all():
                continue  # padding
            texts, images, piece = [], [], []
            for j in range(len(at)):
                if modality[j] == TEXT:
                    if tokens[j] == tok.boi_id:
                        texts.append(tok.decode(piece))
                        piece = []
                        assert modality[j + 1] == IMAGE and spans[j + 1] >= 0
                    elif tokens[j] == tok.eoi_id:
                        assert modality[j - 1] == IMAGE
                    elif tokens[j] != tok.eod_id:
                        piece.append(int(tokens[j]))
                    assert spans[j] == -1
            ids = spans[modality == IMAGE]
            assert (modality[spans >= 0] == IMAGE).all()
            images = sorted(set(ids.tolist()))
            for span in images:  # one whole image per span: 16 patches, contiguous
                where = (spans == span).nonzero().flatten()
                assert len(where) == 16 and (where.diff() == 1).all()
                assert tokens[where[0] - 1] == tok.boi_id and tokens[where[-1] + 1] == tok.eoi_id
            if tokens[-1] != tok.eod_id:
                continue  # a document cut at the end of a sequence: not checked further
            i = captions[" ".join(texts)]  # the text pieces, in order, are one sample's
            assert len(images) == sum(k == "image" for k, _ in interleaved_pieces(i)), (texts, images)
            assert i != int(INTERLEAVED_CORRUPT_KEY[1:])
            seen_two += len(images) == 2
    assert seen_two >= 5
    assert stream.skipped >= 1 and INTERLEAVED_CORRUPT_KEY in stream.skipped_examples[0]


def test_energon_interleaved_training_losses_fall(interleaved, tmp_path):
    run = tmp_path / "run"
    proc = run_train(run, "tiny_transfusion.yaml", BASE + [f"data.paths=[{interleaved}]", "train.steps=20",
                                                           "data.num_workers=1"])
    text, image = losses_by_step(run, "loss_text"), losses_by_step(run, "loss_image")
    assert sorted(text) == list(range(1, 21)), proc.stdout[-2000:]
    first, last = np.mean([text[s] for s in (1, 2, 3)]), np.mean([text[s] for s in (18, 19, 20)])
    assert last < 0.5 * first, (first, last)
    first, last = np.mean([image[s] for s in (1, 2, 3)]), np.mean([image[s] for s in (18, 19, 20)])
    assert last < 0.8 * first, (first, last)
    # 20 steps x 4 sequences of ~4 documents pass the 48 samples: the truncated PNG is met and counted
    assert read_metrics(run)[-1]["data_skipped_samples"] >= 1


def test_energon_interleaved_resume_equals_an_uninterrupted_run(interleaved, tmp_path):
    common = BASE + [f"data.paths=[{interleaved}]", "checkpoint.every=2", "schedule.decay_steps=4",
                     "data.num_workers=0"]
    uninterrupted = tmp_path / "a"
    run_train(uninterrupted, "tiny_transfusion.yaml", common + ["train.steps=4"])
    run = tmp_path / "b"
    run_train(run, "tiny_transfusion.yaml", common + ["train.steps=2"])
    proc = run_train(run, "tiny_transfusion.yaml", common + ["train.steps=4"])
    assert "resumed from step 2" in proc.stdout
    for key in ("loss", "loss_text", "loss_image"):
        want, got = losses_by_step(uninterrupted, key), losses_by_step(run, key)
        assert sorted(got) == list(range(1, 5))
        for s in range(1, 5):  # exact: the same samples in the same sequences after the restart
            assert got[s] == want[s], f"{key} step {s}: {got[s]} != {want[s]}"
