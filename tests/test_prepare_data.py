"""The corpus pipeline (tools/prepare_data.py, nanogpt2/shards.py, the shard path of nanogpt2/data.py): shards
hold exactly the tokens of the documents (end-of-text before each) whatever the chunking and worker count; a cut
never changes a token, and text without spaces (Japanese) is cut into bounded pieces; an interrupted job resumes
to byte-identical shards, one planned differently is refused, and a finished one does nothing; bad input is named;
prepared text trains end to end; training streams a shard folder, resumes bit for bit, and reads it with memory
that does not grow with the corpus (a subprocess under an address-space cap smaller than the corpus)."""
import importlib.util
import json
import os
import random
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanogpt2 import get_tokenizer
from nanogpt2.data import FeistelPermutation, SequenceSampler, Split, shard_splits, tokenize_file
from nanogpt2.shards import (MANIFEST, FORMAT, FORMAT_VERSION, ShardedTokens, encode_header, open_shard_folder,
                             read_header, write_shard)
from nanogpt2.train import TrainConfig, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOT = 50256


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(REPO, "tools", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module  # so worker processes find tokenize_unit by name
    spec.loader.exec_module(module)
    return module


pd = load_tool()

TRICKY = ("First Citizen:\nBefore we proceed,  \n\nhear me speak.\r\n\tAll:\nSpeak, speak. héllo — 123 it's\n"
          "日本語の テキスト\u00a0nbsp\u3000wide <|endoftext|> stays text\n")


def prepare(tmp_path, input, out="out", **kw):
    kw = {"chunk_bytes": 64, "shard_tokens": 100, "workers": 1, "progress": False, "val_fraction": 0.2, **kw}
    cfg = pd.PrepareConfig(input=str(input), out=str(tmp_path / out), **kw)
    return pd.prepare(cfg, log=lambda *a: None), cfg.out


def stream(folder, split):
    t = getattr(open_shard_folder(folder), split)
    return t[0:len(t)]


def corpus(tmp_path):
    """A folder: two text files (one in a subfolder), a JSONL file (a blank line, an empty text), and files that
    are not inputs. Returns (folder, the documents in the order they are written)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text(TRICKY * 3, encoding="utf-8")
    (root / "sub" / "b.txt").write_text("Second document.\nTwo lines, no newline at the end", encoding="utf-8")
    records = [{"text": "A JSONL document.\n\nWith a paragraph.", "id": 1}, {"text": ""}, {"text": TRICKY, "id": 3}]
    (root / "c.jsonl").write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n\n" + json.dumps(records[2]) + "\n",
                                  encoding="utf-8")
    (root / "notes.csv").write_text("x,y\n", encoding="utf-8")
    (root / ".hidden.txt").write_text("skipped", encoding="utf-8")
    return root, [TRICKY * 3, records[0]["text"], records[2]["text"], "Second document.\nTwo lines, no newline at the end"]


# ---- the shards hold exactly the documents ----------------------------------------------------------------

def test_shards_hold_every_document_after_an_end_of_text_whatever_the_chunking_and_workers(tmp_path):
    root, docs = corpus(tmp_path)
    enc = get_tokenizer()
    expected = [t for d in docs for t in [EOT] + enc.encode_ordinary(d)]  # sorted paths: a.txt, c.jsonl, sub/b.txt
    manifest, out = prepare(tmp_path, root)
    train_tokens, val_tokens = stream(out, "train"), stream(out, "val")
    assert train_tokens.tolist() + val_tokens.tolist() == expected
    assert len(val_tokens) > 0 and manifest["val_start"]["source"] == os.path.join("sub", "b.txt")
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(docs)
    assert [s["path"] for s in manifest["job"]["sources"]] == ["a.txt", "c.jsonl", os.path.join("sub", "b.txt")]
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) >= 3 and all(s["tokens"] == 100 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 100
    assert all(read_header(os.path.join(out, s["file"])) == s["tokens"] for s in shards)
    with open(os.path.join(out, shards[0]["file"]), "rb") as f:   # llm.c's header: magic, version, count
        assert np.frombuffer(f.read(12), "<i4").tolist() == [20240520, 1, 100]
    # slices that cross shard boundaries read the same tokens as the whole stream
    t = open_shard_folder(out).train
    rng = np.random.default_rng(0)
    for a in rng.integers(0, len(t), 30):
        b = int(min(len(t), a + rng.integers(0, 250)))
        assert t[int(a):b].tolist() == train_tokens[a:b].tolist()
    # the same job with 2 worker processes and with one unit of 1 MiB: byte-identical shards
    _, out2 = prepare(tmp_path, root, out="out2", workers=2)
    _, out3 = prepare(tmp_path, root, out="out3", chunk_bytes=1 << 20)
    for other in (out2, out3):
        assert stream(other, "train").tolist() == train_tokens.tolist()
        assert stream(other, "val").tolist() == val_tokens.tolist()


def test_a_cut_never_changes_the_tokens():
    """Wherever text_cuts may cut random text (ASCII and Unicode spaces, CR/LF, letters of several scripts,
    combining marks, contractions, digits, punctuation, CJK without spaces), the tokens of the two halves are the
    tokens of the whole; the fast candidate search finds every place _cut_here allows; both rules are exercised."""
    enc = get_tokenizer()
    atoms = ["a", "Zb", "7", "42", "'", "'s", "ll", "re", " ", "  ", "\n", "\n\n", "\t", "\r\n", "\r", "\u00a0",
             "\u3000", "\u0085", "\x1c", "é", "e\u0301", "日本", "語", "。", "、", "²", "Ⅻ", "ñ", "Ωμέγα", "!", "?!",
             "...", "—", "<|endoftext|>", "\x0b", "\x0c", " \n", "-", "_", "{", "}", "\U0001F600", "\u0e01\u0e34"]
    rng, by_rule = random.Random(0), {"space": 0, "class": 0, "non-ASCII": 0}
    for _ in range(600):
        raw = "".join(rng.choice(atoms) for _ in range(rng.randint(1, 60))).encode("utf-8")
        whole = enc.encode_ordinary(raw.decode("utf-8"))
        cuts = list(pd.text_cuts(raw))
        assert cuts == [i for i in range(1, len(raw)) if pd._cut_here(raw, i)], raw
        for i in cuts:
            left, right = raw[:i].decode("utf-8"), raw[i:].decode("utf-8")  # never mid-character
            assert enc.encode_ordinary(left) + enc.encode_ordinary(right) == whole, (left, right)
            by_rule["space" if raw[i] in b" \t\n\r\x0b\x0c" else "class"] += 1
            by_rule["non-ASCII"] += raw[i - 1] >= 0x80 or raw[i] >= 0x80
    assert min(by_rule.values()) > 300, by_rule


def test_cuts_at_spaces_lines_and_class_changes_and_never_beside_unicode_spaces(tmp_path):
    path = tmp_path / "one_line.txt"
    path.write_text("word " * 200, encoding="utf-8")
    with open(path, "rb") as f:
        assert pd.find_cut(f, 3, 1000, "text") == 4            # before the space after "word"
        assert pd.find_cut(f, 999, 1000, "text") is None
    lines = tmp_path / "l.jsonl"
    lines.write_bytes(b'{"text": "x"}\n{"text": "y"}\n')
    with open(lines, "rb") as f:
        assert [pd.find_cut(f, p, 28, "jsonl") for p in (1, 13, 14, 15)] == [14, 14, 14, None]
    assert list(pd.text_cuts("日本語。テスト".encode())) == [9, 12]          # letters | punctuation | letters
    assert list(pd.text_cuts("it's 3rd".encode())) == [2, 4, 6]               # never after "'": 's is one piece
    for spaced in ("a\u00a0 b", "a \u3000b", "a\u3000 b", "a  b", "a\n\nb", "12345"):
        assert list(pd.text_cuts(spaced.encode())) == [], spaced


def test_text_without_spaces_is_cut_into_bounded_pieces_that_tokenize_as_the_whole(tmp_path):
    """Japanese without a single ASCII space or newline: 2 workers tokenize many small units (none over
    (1 + MAX_PIECE) chunks), and the shards hold the tokens of the whole text. A text with no place to cut at
    all (digits) is refused, naming the file, rather than read as one piece."""
    sentences = ["吾輩は猫である。", "名前はまだ無い。", "どこで生れたかとんと見当がつかぬ。", "「何でも薄暗い」", "２０２４年、"]
    text = "".join(random.Random(1).choice(sentences) for _ in range(300))
    path = tmp_path / "neko.txt"
    path.write_text(text, encoding="utf-8")
    assert b" " not in path.read_bytes() and b"\n" not in path.read_bytes()
    cfg = pd.PrepareConfig(input=str(path), out="", chunk_bytes=256, val_fraction=0.1)
    units, _ = pd.plan(pd.find_sources(str(path)), cfg)
    sizes = [u.nbytes for split in units.values() for u in split]
    assert len(sizes) > 20 and max(sizes) < (1 + pd.MAX_PIECE) * 256, sizes
    manifest, out = prepare(tmp_path, path, chunk_bytes=256, workers=2, val_fraction=0.1, shard_tokens=1000)
    assert stream(out, "train").tolist() + stream(out, "val").tolist() == [EOT] + get_tokenizer().encode_ordinary(text)
    digits = tmp_path / "digits.txt"
    digits.write_text("1234567890" * 200, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(f"{digits}, line 1: no place to cut the text in bytes 64 .. 256")):
        prepare(tmp_path, digits, out="digits", val_fraction=0)


# ---- resuming, idempotence, refusing another job -----------------------------------------------------------

def test_an_interrupted_job_resumes_to_identical_shards_and_a_finished_job_does_nothing(tmp_path, monkeypatch):
    root, _ = corpus(tmp_path)
    _, reference = prepare(tmp_path, root, out="reference", shard_tokens=37)

    real, calls = pd.tokenize_unit, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 7:
            raise KeyboardInterrupt  # a Ctrl-C in the middle of the train split
        return real(*args)

    monkeypatch.setattr(pd, "tokenize_unit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(tmp_path, root, shard_tokens=37)
    monkeypatch.setattr(pd, "tokenize_unit", real)
    out = str(tmp_path / "out")
    manifest = json.load(open(os.path.join(out, MANIFEST)))
    assert not manifest["complete"] and manifest["splits"]["train"]["shards"]
    assert manifest["splits"]["train"]["resume"]["skip"] > 0     # the next shard starts inside a unit
    assert not [n for n in os.listdir(out) if ".tmp" in n]       # the shard in progress was dropped
    with pytest.raises(ValueError, match="has not finished this folder"):
        shard_splits(out, block_size=8)
    open(os.path.join(out, "train_000099.bin.tmp"), "wb").write(b"half a shard from a killed run")
    # an unfinished folder that a version cutting units differently started is refused, not resumed
    shutil.copytree(out, tmp_path / "older")
    older = json.load(open(tmp_path / "older" / MANIFEST))
    del older["plan_version"]
    json.dump(older, open(tmp_path / "older" / MANIFEST, "w"))
    with pytest.raises(ValueError, match=r"another version of tools/prepare_data.py started \(work-unit plan 1, "
                                         r"this one plans 2\)"):
        prepare(tmp_path, root, out="older", shard_tokens=37)
    older["plan_version"], older["splits"]["train"]["units"] = 2, older["splits"]["train"]["units"] + 1
    json.dump(older, open(tmp_path / "older" / MANIFEST, "w"))
    with pytest.raises(ValueError, match="differs from the one its manifest records"):
        prepare(tmp_path, root, out="older", shard_tokens=37)

    lines = []
    done = pd.prepare(pd.PrepareConfig(input=str(root), out=out, chunk_bytes=64, shard_tokens=37, workers=1,
                                       progress=False, val_fraction=0.2), log=lines.append)
    assert lines[0].startswith(f"resuming {out}") and done["complete"]
    names = sorted(n for n in os.listdir(reference) if n.endswith(".bin"))
    assert names == sorted(n for n in os.listdir(out) if n.endswith(".bin"))
    for n in names:
        assert open(os.path.join(reference, n), "rb").read() == open(os.path.join(out, n), "rb").read(), n
    ref_manifest = json.load(open(os.path.join(reference, MANIFEST)))
    assert done["splits"] == ref_manifest["splits"]

    mtimes = {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)}
    lines.clear()
    pd.prepare(pd.PrepareConfig(input=str(root), out=out, chunk_bytes=64, shard_tokens=37, workers=1,
                                progress=False, val_fraction=0.2), log=lines.append)
    assert "complete already" in lines[0] and "nothing to do" in lines[0]
    assert {n: os.stat(os.path.join(out, n)).st_mtime_ns for n in os.listdir(out)} == mtimes

    # a source touched but not changed: recorded, so that the run after it hashes nothing
    os.utime(root / "a.txt", ns=(10**18, 10**18))
    prepare(tmp_path, root, shard_tokens=37)
    assert json.load(open(os.path.join(out, MANIFEST)))["source_mtimes"]["a.txt"] == 10**18
    monkeypatch.setattr(pd, "sha256_of", lambda path: pytest.fail(f"hashed {path} again"))
    assert prepare(tmp_path, root, shard_tokens=37)[0]["complete"]


def test_another_job_in_the_same_folder_is_refused(tmp_path):
    root, _ = corpus(tmp_path)
    prepare(tmp_path, root)
    with pytest.raises(ValueError, match=re.escape("holds another job: --shard-tokens 100 (now 200)")):
        prepare(tmp_path, root, shard_tokens=200)
    (root / "a.txt").write_text("changed", encoding="utf-8")
    with pytest.raises(ValueError, match=r"a\.txt changed \([\d,]+ -> 7 bytes"):
        prepare(tmp_path, root)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("keep me")
    with pytest.raises(ValueError, match="is not empty and has no manifest.json"):
        prepare(tmp_path, root, out="busy")


# ---- bad input -------------------------------------------------------------------------------------------------

def test_bad_input_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'/nonexistent/corpus' does not exist"):
        prepare(tmp_path, "/nonexistent/corpus")
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"the corpus is empty \(1 file, 0 bytes\)"):
        prepare(tmp_path, empty)
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "a.csv").write_text("x\n")
    with pytest.raises(ValueError, match=r"has no text files \(\*\.txt\) or JSONL files \(\*\.jsonl\); it has 1 "
                                         r"other files \(a\.csv\)"):
        prepare(tmp_path, folder)
    jsonl = tmp_path / "d.jsonl"
    good = json.dumps({"text": "fine " * 30})
    jsonl.write_text("\n".join([good] * 6 + [json.dumps({"body": "x", "id": 7})]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}, line 7: no 'text' field (its fields: 'body', 'id'); "
                                                   f"pass --text-field NAME")):
        prepare(tmp_path, jsonl, out="j1", val_fraction=0)
    jsonl.write_text("\n".join([good] * 4 + ["{not json"]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}, line 5: not a JSON object")):
        prepare(tmp_path, jsonl, out="j2", val_fraction=0)
    jsonl.write_text("\n".join([good, json.dumps({"text": 3})]) + "\n")
    with pytest.raises(ValueError, match=re.escape(f"{jsonl}, line 2: field 'text' is a JSON int, not a string")):
        prepare(tmp_path, jsonl, out="j3", val_fraction=0)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"ok\nfine\ncaf\xe9\n")
    with pytest.raises(ValueError, match=re.escape(f"{latin1}, line 3: not UTF-8 text (invalid continuation byte: "
                                                   f"byte 0xe9)")):
        prepare(tmp_path, latin1, out="l", val_fraction=0)
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("no break here at all")
    with pytest.raises(ValueError, match=r"--val-fraction 0.01 holds out the last 0 of the input's 20 bytes"):
        prepare(tmp_path, tiny, out="t", val_fraction=0.01)
    with pytest.raises(ValueError, match=r"--val-fraction must be in \[0, 1\), got 1.5"):
        pd.PrepareConfig(input="x", out="y", val_fraction=1.5)
    assert pd.main(["--input", "/nonexistent", "--out", str(tmp_path / "o")]) == 2  # the CLI: a message, status 2


def test_a_bad_shard_or_folder_is_named(tmp_path):
    path = str(tmp_path / "x.bin")
    write_shard(path, np.arange(10, dtype=np.uint16))
    assert read_header(path) == 10
    raw = bytearray(open(path, "rb").read())
    raw[0:4] = np.int32(20240801).tobytes()
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"magic number 20240801, expected 20240520 .*: llm.c's LLaMA-3 token file"):
        read_header(path)
    raw[0:8] = np.array([20240520, 2], "<i4").tobytes()
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match=r"x\.bin: version 2, expected 1 \(uint16 tokens\)"):
        read_header(path)
    open(path, "wb").write(encode_header(10) + b"\x00" * 6)
    with pytest.raises(ValueError, match=r"header says 10 tokens, so 1,044 bytes, but the file has 1,030"):
        read_header(path)
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="format 'something-else', expected 'nanogpt2-token-shards'"):
        open_shard_folder(str(folder))
    with pytest.raises(ValueError, match="is a folder without a manifest.json"):
        tokenize_file(str(tmp_path))


# ---- training on a shard folder ---------------------------------------------------------------------------------

def shard_folder(folder, splits: dict) -> str:
    """A complete shard folder written directly (no tokenizing): {split: [token arrays, one per shard]}."""
    os.makedirs(folder, exist_ok=True)
    entry = {}
    for split in ("train", "val"):
        entry[split] = {"shards": []}
        for i, toks in enumerate(splits.get(split, [])):
            name = f"{split}_{i:06d}.bin"
            write_shard(os.path.join(folder, name), toks)
            entry[split]["shards"].append({"file": name, "tokens": len(toks), "max_token": int(toks.max())})
    with open(os.path.join(folder, MANIFEST), "w") as f:
        json.dump({"format": FORMAT, "format_version": FORMAT_VERSION, "complete": True, "splits": entry}, f)
    return str(folder)


WORDS = [" the", " to", " of", " and", " is", " on", " that", " for", " he", " it"]  # single tokens, ids < 512


@pytest.fixture
def one_thread():
    """Width-32 models gain nothing from a second intra-op thread, and on a busy machine OpenMP's waiting for it
    made each tiny op take milliseconds (18 s for this test at load 7; 1.5 s with one thread)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_training_streams_a_shard_folder_and_resumes_bitwise(tmp_path, one_thread):
    rng = random.Random(0)
    (tmp_path / "docs").mkdir()
    for i in range(6):
        (tmp_path / "docs" / f"{i:02d}.txt").write_text("".join(rng.choice(WORDS) for _ in range(40)))
    _, prepared = prepare(tmp_path, tmp_path / "docs", out="prepared", val_fraction=0.25)

    def cfg(**kw):
        return TrainConfig(**{**dict(data=prepared, n_layer=2, n_head=2, n_embd=32, vocab_size=512, block_size=32,
                                     batch_size=2, grad_accum=2, max_steps=4, eval_interval=2, eval_iters=2,
                                     log_interval=1, warmup_steps=2, lr=3e-3, dropout=0.1, device="cpu", seed=7,
                                     dtype="float32", out_dir=str(tmp_path / "out")), **kw})

    # --data takes the prepared folder; its manifest's largest id (the end-of-text, 50256) meets the vocab check
    with pytest.raises(ValueError, match=r"has token id 50256, out of range for vocab_size 512"):
        train(cfg())
    # ids < 512 (a 512-entry vocabulary keeps the model tiny) in shards of sizes that sequences straddle
    ids = np.random.default_rng(0)
    folder = shard_folder(tmp_path / "small", {"train": [ids.integers(0, 512, n, dtype=np.uint16) for n in (150, 101, 160)],
                                               "val": [ids.integers(0, 512, 80, dtype=np.uint16)]})
    straight = train(cfg(data=folder, out_dir=str(tmp_path / "straight")))  # 16 sequences: into a 2nd epoch of 12
    assert straight.val_loss is not None and straight.step == 4
    train(cfg(data=folder, out_dir=str(tmp_path / "resumed"), max_steps=2, lr_decay_steps=4))
    train(cfg(data=folder, out_dir=str(tmp_path / "resumed"), lr_decay_steps=4, resume=True))
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_prepared_text_trains_end_to_end(tmp_path, one_thread):
    """tools/prepare_data.py on a slice of tinyshakespeare, then tools/train.py --data on the folder: the splits
    hold the text's tokens after an end-of-text, and a GPT-2-vocabulary model (tiny otherwise) trains on them."""
    text = open(os.path.join(REPO, "nanogpt2", "assets", "data", "tinyshakespeare.txt"), encoding="utf-8").read(20000)
    (tmp_path / "play.txt").write_text(text, encoding="utf-8")
    _, folder = prepare(tmp_path, tmp_path / "play.txt", out="play", chunk_bytes=4096, shard_tokens=1500,
                        val_fraction=0.2)
    train_split, val_split = shard_splits(folder, 16)
    assert train_split.tokens[0:len(train_split.tokens)].tolist() + val_split.tokens[0:len(val_split.tokens)].tolist() \
        == [EOT] + get_tokenizer().encode_ordinary(text)
    result = train(TrainConfig(data=folder, n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=3,
                               eval_interval=3, eval_iters=2, log_interval=1, warmup_steps=1, lr=1e-2, device="cpu",
                               dtype="float32", out_dir=str(tmp_path / "out")))
    assert result.step == 3 and 0 < result.val_loss < 11.5    # ln(50257) = 10.8: a sane loss
    assert load_file(str(tmp_path / "out" / "model.safetensors"))["transformer.wte.weight"].shape == (50257, 16)


def test_too_few_tokens_in_a_shard_folder_is_a_clear_error(tmp_path):
    folder = shard_folder(tmp_path / "f", {"train": [np.arange(20, dtype=np.uint16)], "val": [np.arange(5, dtype=np.uint16)]})
    with pytest.raises(ValueError, match=r"has 20 training tokens, fewer than block_size \+ 1 = 33 .* below 20"):
        shard_splits(folder, 32)
    with pytest.raises(ValueError, match=r"its validation split has 5 tokens, fewer than block_size \+ 1 = 11"):
        shard_splits(folder, 10)


def test_feistel_order_visits_every_sequence_once_per_epoch():
    for n in (1, 2, 3, 5, 64, 1000, 4097):
        perm = FeistelPermutation(n, seed=7, epoch=0)
        assert sorted(perm[i] for i in range(n)) == list(range(n))
    first = [FeistelPermutation(1000, 7, 0)[i] for i in range(1000)]
    # pinned: a run saved by this nanogpt2 and resumed by a later one must read the same sequences in the same order
    assert first[:8] == [185, 230, 631, 378, 727, 515, 617, 34]
    # and shuffled: hardly a sequence in place, hardly two neighbours still neighbours
    assert sum(first[i] == i for i in range(1000)) < 10 and sum(abs(a - b) == 1 for a, b in zip(first, first[1:])) < 10
    assert first != [FeistelPermutation(1000, 7, 1)[i] for i in range(1000)]
    assert first != [FeistelPermutation(1000, 8, 0)[i] for i in range(1000)]
    split = Split(ShardedTokens([], []), 4)
    split.tokens.starts = [0, 4001]  # 1000 sequences; the order alone is under test, nothing is read
    s = SequenceSampler(split, seed=7)
    assert [s.index(k) for k in range(1000, 2000)] == [FeistelPermutation(1000, 7, 1)[i] for i in range(1000)]


MEMORY_PROBE = textwrap.dedent("""
    import resource, sys
    from nanogpt2.data import SequenceSampler, shard_splits

    def vm_kib(field):
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field))

    folder, cap_mib, block = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    train, val = shard_splits(folder, block)
    # first use, on the val split (other files): numpy/torch allocate working memory, OpenMP starts its threads
    int(SequenceSampler(val, seed=0).batch(0, 64)[0].sum())
    sampler = SequenceSampler(train, seed=0)
    # the cap: this process may map only cap_mib more address space from here on (mmap included)
    limit = (vm_kib("VmSize") + cap_mib * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    try:
        open("/proc/self/clear_refs", "w").write("5")   # restart the peak-RSS count (VmHWM) from here
    except OSError:
        pass                                            # then VmHWM includes the imports' peak: still a bound
    rss0, total = vm_kib("VmRSS"), 0
    for start in range(0, train.num_sequences, 64):   # one epoch: every sequence of every shard
        x, y = sampler.batch(start, min(64, train.num_sequences - start))
        total += int(x.sum())
    # VmHWM, not getrusage's ru_maxrss: that one starts from the parent's RSS at fork (it survives exec)
    print(len(train.tokens) * 2 >> 20, (vm_kib("VmHWM") - rss0) >> 10, total)
""")


def test_reading_a_shard_folder_takes_memory_independent_of_its_size(tmp_path):
    """An epoch over a 32 MiB corpus (4 shards) under an 8 MiB address-space cap (RLIMIT_AS, set after imports): a
    reader that loaded the corpus, or mapped its shards, would fail; resident memory grows by less than 8 MiB."""
    rng = np.random.default_rng(0)
    folder = shard_folder(tmp_path / "big", {"train": [rng.integers(0, 50257, 4 << 20, dtype=np.uint16)
                                                       for _ in range(4)],
                                             "val": [rng.integers(0, 50257, 64 * 1024 + 1, dtype=np.uint16)]})
    probe = subprocess.run([sys.executable, "-c", MEMORY_PROBE, folder, "8", "1024"], capture_output=True, text=True,
                           cwd=REPO, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert probe.returncode == 0, probe.stderr[-3000:]
    corpus_mib, rss_growth_mib, total = map(int, probe.stdout.split())
    assert corpus_mib == 32 and rss_growth_mib < 8, probe.stdout
    full = stream(folder, "train")
    n = (len(full) - 1) // 1024
    assert total == int(full[:n * 1024].astype(np.int64).sum())  # x of every sequence, each read once
