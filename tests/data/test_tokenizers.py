"""Any tokenizer (issue 26): a plain sentencepiece model (no reserved pieces) and a Hugging Face
tokenizer directory (a tiny byte-level BPE trained here with the ``tokenizers`` library).

For each: the ids of text are the library's own, the special tokens the sequence format needs
are appended after the vocabulary, and the real tools run end to end: ``megafusion
preprocess-data`` -> 20 training steps of a tiny Transfusion model on the indexed text ->
``megafusion generate``; the tokenizer mapping is stored beside the data and in the run dir.
Data made with one tokenizer is refused (one line naming both) when training names another.
"""

import json
import random

import numpy as np
import pytest

from conftest import losses_by_step, run_train
from megafusion.data.tokenizer import (EOD, HUGGINGFACE, SENTENCEPIECE, HuggingFaceTokenizer, Tokenizer,
                                       load_tokenizer, padded_vocab_size)

COLOURS = "red green blue yellow purple".split()
SHAPES = "circle square triangle star".split()
PLACES = "left|right|top|bottom|centre|top left|bottom right".split("|")
TEXTS = ["a red circle moves left .", "There is a big blue square at the top.", "größe ✓ 42", "", "  two  spaces"]
CONFIG = "tiny_transfusion_indexed.yaml"


def caption(rng: random.Random) -> str:
    """A ShapesWorld-style caption."""
    n = rng.randint(1, 3)
    parts = [f"a {rng.choice(['small', 'big'])} {rng.choice(COLOURS)} {rng.choice(SHAPES)} "
             f"at the {rng.choice(PLACES)}" for _ in range(n)]
    return "There is " + " and ".join(parts) + " ."


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok_corpus")
    rng = random.Random(0)
    lines = [caption(rng) for _ in range(400)]
    (d / "corpus.txt").write_text("\n".join(lines) + "\n")
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": line}) + "\n" for line in lines[:120]))
    return d


@pytest.fixture(scope="module")
def sp_model(corpus):
    """A plain sentencepiece model: unk/bos/eos only, no <pad>, no user-defined symbols."""
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(input=str(corpus / "corpus.txt"), model_prefix=str(corpus / "plain"),
                                   vocab_size=120, hard_vocab_limit=False, minloglevel=2)
    return corpus / "plain.model"


@pytest.fixture(scope="module")
def hf_dir(corpus):
    """A byte-level BPE saved as a Hugging Face tokenizer directory (tokenizer.json only)."""
    from tokenizers import Tokenizer as HF
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HF(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["[UNK]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator((corpus / "corpus.txt").read_text().splitlines(), trainer)
    out = corpus / "bpe"
    out.mkdir()
    tok.save(str(out / "tokenizer.json"))
    return out


def library_encode(kind, path, text):
    if kind == SENTENCEPIECE:
        import sentencepiece as spm

        return spm.SentencePieceProcessor(model_file=str(path)).encode(text)
    from tokenizers import Tokenizer as HF

    return HF.from_file(str(path / "tokenizer.json")).encode(text, add_special_tokens=False).ids


@pytest.fixture(params=[SENTENCEPIECE, HUGGINGFACE])
def kind_path(request, sp_model, hf_dir):
    return request.param, (sp_model if request.param == SENTENCEPIECE else hf_dir)


def test_padded_vocab_size_is_megatrons():
    assert padded_vocab_size(1) == 128 and padded_vocab_size(128) == 128 and padded_vocab_size(129) == 256
    assert padded_vocab_size(50257, 128, tp=2) == 50432  # GPT-2's, as megatron pads it
    assert padded_vocab_size(300, 64) == 320


def test_ids_are_the_librarys_and_specials_are_appended(kind_path):
    kind, path = kind_path
    tok = load_tokenizer(path, kind)
    assert isinstance(tok, Tokenizer if kind == SENTENCEPIECE else HuggingFaceTokenizer)
    for text in TEXTS:
        assert tok.encode(text) == library_encode(kind, path, text)
    base = tok.base_vocab_size
    if kind == SENTENCEPIECE:
        assert tok.eod_id == tok.sp.eos_id() == 2  # the model's own eos
        assert tok.added == ["<pad>", "<boi>", "<eoi>", "<frame>"]
    else:
        assert tok.added == ["<pad>", "<boi>", "<eoi>", "<frame>", EOD]  # no eos: <eod> appended
        assert tok.eod_id == base + 4
    assert (tok.pad_id, tok.boi_id, tok.eoi_id, tok.frame_id) == (base, base + 1, base + 2, base + 3)
    assert tok.vocab_size == base + len(tok.added)
    # decode: text round-trips; added <pad>/<eod> are dropped, the markers spelled
    text = "There is a big red circle at the left ."  # characters the models have seen
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode([tok.pad_id, *ids, tok.eod_id, tok.vocab_size + 7]) == text
    assert tok.decode([*ids, tok.boi_id, tok.eoi_id]) == text + "<boi><eoi>"
    # actions: none reserved, written as text unless asked for
    assert tok.action_ids() == {} and tok.encode_action("left") == tok.encode("left")
    with_actions = load_tokenizer(path, kind, actions=["up", "down"])
    assert with_actions.action_ids() == {"up": tok.vocab_size, "down": tok.vocab_size + 1}
    mapping = tok.mapping()
    assert mapping["type"] == kind and mapping["base_vocab_size"] == base and mapping["vocab_size"] == tok.vocab_size
    assert mapping["special_tokens"]["boi"] == tok.boi_id and len(mapping["sha256"]) == 64


def test_wrong_type_is_refused_naming_the_other(sp_model, hf_dir):
    with pytest.raises(ValueError, match=HUGGINGFACE):
        load_tokenizer(hf_dir, SENTENCEPIECE)
    with pytest.raises(ValueError, match="not a Hugging Face tokenizer.json|no tokenizer.json"):
        load_tokenizer(sp_model, HUGGINGFACE)


def test_a_directory_without_tokenizer_json_is_read_by_transformers(hf_dir, tmp_path):
    """vocab.json + merges.txt + tokenizer_config.json (no tokenizer.json): AutoTokenizer, local files only."""
    from tokenizers import Tokenizer as HF

    HF.from_file(str(hf_dir / "tokenizer.json")).model.save(str(tmp_path))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer",
                                                                "eos_token": "[UNK]"}))
    tok, reference = load_tokenizer(tmp_path, HUGGINGFACE), load_tokenizer(hf_dir, HUGGINGFACE)
    assert tok.auto is not None and tok.hf is None
    text = "There is a big red circle at the left ."
    assert tok.encode(text) == reference.encode(text) == tok.auto.encode(text, add_special_tokens=False)
    assert tok.decode(tok.encode(text)) == text
    assert tok.eod_id == tok._vocab["[UNK]"]  # the eos_token of tokenizer_config.json
    assert tok.boi_id == tok.base_vocab_size + 1


def test_a_megafusion_model_keeps_its_ids(tmp_path):
    """tools/train_tokenizer.py's models reserve every special: nothing is appended."""
    from megafusion.data.tokenizer import train_tokenizer

    (tmp_path / "c.txt").write_text("a red circle moves left .\n" * 30)
    tok = load_tokenizer(train_tokenizer([tmp_path / "c.txt"], tmp_path / "t", vocab_size=300), SENTENCEPIECE)
    assert tok.added == [] and tok.vocab_size == tok.base_vocab_size
    assert (tok.pad_id, tok.eod_id) == (3, 2)


def preprocess(kind, path, corpus, out, *extra):
    from megafusion.data.preprocess import main

    rc = main(["--input", str(corpus / "docs.jsonl"), "--output-prefix", str(out), "--tokenizer-type", kind,
               "--tokenizer-model", str(path), "--json-keys", "text", "--shard-size", "50", "--no-progress", *extra])
    assert rc == 0
    return f"{out}_text_document"


def overrides(kind, path, prefix, vocab, *extra):
    return [f"data.paths=[{prefix}]", "data.weights=[1.0]", f"data.tokenizer={path}",
            f"data.tokenizer_type={kind}", f"model.vocab_size={vocab}", "model.seq_length=128",
            "train.global_batch_size=4", "logging.tensorboard=false", "checkpoint.every=0", *extra]


def test_preprocess_train_generate(kind_path, corpus, tmp_path):
    from megafusion.data.indexed import IndexedDocuments, meta_path
    from megafusion.inference.cli import main as generate

    kind, path = kind_path
    tok = load_tokenizer(path, kind)
    prefix = preprocess(kind, path, corpus, tmp_path / "data" / "web", "--append-eod",  # 3 shards, merged
                        *(["--workers", "2"] if kind == HUGGINGFACE else []))
    docs = IndexedDocuments(prefix)
    first = json.loads((corpus / "docs.jsonl").read_text().splitlines()[0])["text"]
    assert np.asarray(docs.tokens[0]).tolist() == library_encode(kind, path, first) + [tok.eod_id]
    del docs
    stored = json.loads((tmp_path / "data" / "web_text_document.tokenizer_map.json").read_text())
    assert stored == tok.mapping()
    assert json.loads((tmp_path / "data" / "web_text_document.meta.json").read_text())["tokenizer"] == stored
    assert json.loads(open(meta_path(prefix)).read())["eod_id"] == tok.eod_id

    run = tmp_path / "run"
    vocab = padded_vocab_size(tok.vocab_size, 64)
    run_train(run, CONFIG, overrides(kind, path, prefix, vocab, "train.steps=20"))
    assert json.loads((run / "tokenizer_map.json").read_text()) == stored
    loss = losses_by_step(run, "loss_text")
    assert sorted(loss) == list(range(1, 21))
    first3, last3 = np.mean([loss[s] for s in (1, 2, 3)]), np.mean([loss[s] for s in (18, 19, 20)])
    assert last3 < 0.7 * first3, (first3, last3)

    out = tmp_path / "gen"
    assert generate(["--run-dir", str(run), "--prompt", "There is a", "--max-new-tokens", "8",
                     "--temperature", "0", "--out", str(out)]) == 0
    record = json.loads((out / "generation.json").read_text())
    assert isinstance(record["text"], str) and record["text"]
    if kind == HUGGINGFACE:  # an export carries the tokenizer directory; an import reads it back
        from megafusion.config import load_config
        from megafusion.interop.export import export_run
        from megafusion.interop.import_ import import_export

        export_run(run, tmp_path / "export")
        exported = json.loads((tmp_path / "export" / "config.json").read_text())["megafusion"]
        assert exported["config"]["data"]["tokenizer"] == path.name
        assert (tmp_path / "export" / path.name / "tokenizer.json").is_file()
        info = exported["architecture"]["text"]["tokenizer"]
        assert info["type"] == "huggingface" and info["sha256"] == stored["sha256"] and info["added_tokens"]
        import_export(tmp_path / "export", tmp_path / "imported")
        cfg = load_config(tmp_path / "imported" / "config.yaml")
        assert cfg.data.tokenizer_type == HUGGINGFACE
        assert load_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_type).mapping()["sha256"] == stored["sha256"]


def test_preprocess_help_shows_defaults_under_the_program_name(capsys):
    from megafusion.data.preprocess import main

    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert exit_.value.code == 0 and out.startswith("usage: megafusion preprocess-data")
    for flag in ("--tokenizer-type", "--append-eod", "--workers"):
        assert flag in out
    assert "(default: SentencePieceTokenizer)" in out and "(default: 1)" in out and "(default: False)" in out


def test_data_of_another_tokenizer_is_refused_in_one_line(sp_model, hf_dir, corpus, tmp_path):
    from megafusion.data.indexed import IndexedDocuments

    prefix = preprocess(SENTENCEPIECE, sp_model, corpus, tmp_path / "sp")  # without --append-eod: no eod
    first = json.loads((corpus / "docs.jsonl").read_text().splitlines()[0])["text"]
    docs = IndexedDocuments(prefix)  # held: its arrays are views of the memory map
    assert np.asarray(docs.tokens[0]).tolist() == library_encode(SENTENCEPIECE, sp_model, first)
    del docs
    vocab = padded_vocab_size(load_tokenizer(hf_dir, HUGGINGFACE).vocab_size, 64)
    proc = run_train(tmp_path / "run", CONFIG, overrides(HUGGINGFACE, hf_dir, prefix, vocab, "train.steps=2"),
                     expect_rc=2)
    lines = [line for line in proc.stderr.strip().splitlines() if str(prefix) in line]
    assert len(lines) == 1, proc.stderr
    assert str(sp_model) in lines[0] and str(hf_dir) in lines[0], lines[0]
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
