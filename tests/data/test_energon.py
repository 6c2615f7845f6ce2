"""data.kind = energon: WebDataset shards prepared with Energon's own API train the Transfusion
model (both losses fall), a corrupt image is skipped and counted, and a resumed run reads
exactly the samples of an uninterrupted one.

The dataset is written here: tar shards of KEY.png + KEY.txt (32x32 coloured squares and
their captions), one of them with a truncated PNG, prepared with
``BaseWebdatasetFactory.prepare_dataset`` (what ``energon prepare`` runs) and a
``.nv-meta/dataset.yaml`` for ``CaptioningSample`` with the field map png/txt.
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
BASE = ["data.kind=energon", "logging.tensorboard=false", "train.global_batch_size=4", "train.micro_batch_size=2"]


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
        {"sample_type": {"__module__": "megatron.energon", "__class__": "InterleavedSample"}}))
    cfg = Config()
    cfg.model.kind, cfg.data.kind, cfg.data.paths = "transfusion", "energon", [str(other), str(tmp_path / "nothing")]
    with pytest.raises(ConfigError) as err:
        validate(cfg, 1)
    assert "InterleavedSample" in str(err.value) and "not supported" in str(err.value)
    assert "neither an Energon-prepared dataset" in str(err.value)
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
