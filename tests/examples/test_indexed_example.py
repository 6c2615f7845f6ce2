"""docs/data.md's path, end to end: your own files -> the real tools -> examples/configs/
tiny_transfusion_indexed.yaml trains on them.

A tiny corpus is made in tmp as a user would bring it: text documents as JSONL, captioned
32x32 images as JSONL (paths relative to the file), as a webdataset-style tar and as a
folder of KEY.png + KEY.txt. The tokenizer and the datasets are made by the commands the
example config's header shows; the config trains on them for a few steps with only
``data.paths`` / ``data.tokenizer`` overridden, and both losses are logged and finite.
"""

import io
import json
import math
import random
import subprocess
import sys
import tarfile

import numpy as np
import yaml

from conftest import CONFIGS, REPO, read_metrics, run_train

CONFIG = "tiny_transfusion_indexed.yaml"
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
WORDS = "the a small big circle square triangle moves left right up down near far".split()


def tool(*args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{args[0]} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def png(colour: str, rng: random.Random) -> bytes:
    from PIL import Image

    img = np.zeros((32, 32, 3), np.uint8)
    x, y = rng.randrange(0, 24), rng.randrange(0, 24)
    img[y:y + 8, x:x + 8] = COLOURS[colour]
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_indexed_example_trains_on_preprocessed_own_data(tmp_path):
    cfg = yaml.safe_load((CONFIGS / CONFIG).read_text())
    assert cfg["data"]["kind"] == "indexed" and cfg["model"]["kind"] == "transfusion"
    size, patch, vocab = cfg["vision"]["image_size"], cfg["vision"]["patch_size"], cfg["model"]["vocab_size"]

    rng = random.Random(0)
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    (src / "folder").mkdir()
    captions = [f"a {c} square" for c in COLOURS]
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + " ." for _ in range(60)]
    (src / "corpus.txt").write_text("\n".join(docs + captions * 20) + "\n")
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    pairs = []
    with tarfile.open(src / "shard-000.tar", "w") as tar:
        for i in range(24):
            colour = list(COLOURS)[i % 3]
            data = png(colour, rng)
            if i < 12:  # JSONL with image paths relative to it
                (src / "img" / f"{i}.png").write_bytes(data)
                pairs.append({"image": f"img/{i}.png", "text": f"a {colour} square"})
            elif i < 18:  # a webdataset-style tar
                for name, payload in [(f"s{i}.png", data), (f"s{i}.txt", f"a {colour} square".encode())]:
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
            else:  # a folder of KEY.png + KEY.txt
                (src / "folder" / f"f{i}.png").write_bytes(data)
                (src / "folder" / f"f{i}.txt").write_text(f"a {colour} square")
    (src / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))

    out = tmp_path / "data"
    tool("tools/train_tokenizer.py", "--input", str(src / "corpus.txt"), "--model-prefix", str(out / "tok"),
         "--vocab-size", str(vocab))
    tool("tools/preprocess_data.py", "--input", str(src / "docs.jsonl"), "--output-prefix", str(out / "web"),
         "--tokenizer-model", str(out / "tok.model"), "--json-keys", "text", "--append-eod", "--no-progress")
    tool("tools/preprocess_data.py", "--input", str(src / "pairs.jsonl"), str(src / "shard-000.tar"),
         str(src / "folder"), "--output-prefix", str(out / "pairs"), "--kind", "image-text",
         "--image-size", str(size), "--patch-size", str(patch), "--tokenizer-model", str(out / "tok.model"),
         "--append-eod", "--no-progress")

    from megafusion.data.indexed import IndexedDocuments

    assert len(IndexedDocuments(out / "pairs")) == 24  # every pair of the three input forms

    run = tmp_path / "run"
    steps = 4
    run_train(run, CONFIG, [f"data.paths=[{out / 'web_text_document'},{out / 'pairs'}]",
                            f"data.tokenizer={out / 'tok.model'}", f"train.steps={steps}",
                            "logging.tensorboard=false", "checkpoint.save_final=false"])
    metrics = read_metrics(run)
    assert [m["step"] for m in metrics] == list(range(1, steps + 1))
    for key in ("loss", "loss_text", "loss_image"):
        assert all(key in m and math.isfinite(m[key]) for m in metrics), (key, metrics)
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["paths"] == [str(out / "web_text_document"), str(out / "pairs")]
