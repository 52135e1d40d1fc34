"""Prepare a corpus for training: text files, a folder of them, or JSONL -> a folder of GPT-2 token shards.

    python tools/prepare_data.py --input corpus.txt  --out data/corpus
    python tools/prepare_data.py --input texts/      --out data/texts --val-fraction 0.001
    python tools/prepare_data.py --input docs.jsonl  --out data/docs  --text-field content --workers 8
    python tools/train.py --data data/docs ...       # streamed from the shards: memory does not grow with the corpus

Inputs. `--input` is a UTF-8 text file, a JSONL file (name ending in .jsonl: one JSON object per line, the
document in `--text-field`), or a folder searched recursively for *.txt and *.jsonl files (hidden files and
folders skipped), read in sorted order of their paths. A text file is one document; a JSONL line is one.
Blank JSONL lines and empty texts are skipped; a line that is not a JSON object with a string in the field
stops the job with its file and line number.

Documents. Each document is tokenized with tiktoken's "gpt2" encoding (nanogpt2.tokenizer, offline) as
ordinary text (a literal "<|endoftext|>" in a document stays text) and preceded by the end-of-text token
50256, as llm.c's dev/data/fineweb.py does: GPT-2 was trained with <|endoftext|> between documents (OpenAI's
gpt-2 src/generate_unconditional_samples.py starts sampling from it), so the model learns that what follows it
is a new document and need not continue the one before. (nanoGPT's data/openwebtext/prepare.py appends it instead; prepending puts one
before the very first document too.)

Split. The last --val-fraction of the corpus, measured in bytes of input, is the val split; it starts at the
first place at or after that point where the text can be cut (next JSONL line; in a text file, the next lone
space, tab or newline between two printable ASCII characters, so a document can straddle the split; the
start of the next file if there is none). Deterministic: the same input and options give the same split.

Output (--out):
    manifest.json          what is here (below); tools/train.py --data recognises a shard folder by it
    train_000000.bin ...   the train split, --shard-tokens tokens per file (the last holds the rest)
    val_000000.bin ...     the val split (none with --val-fraction 0)
Each .bin is llm.c's GPT-2 token file: a 1024-byte header of 256 little-endian int32 (magic 20240520,
version 1, token count, then zeros) and the tokens as little-endian uint16 (layout table in nanogpt2/shards.py).
A split is the concatenation of its shards in order; a document may continue into the next shard.

manifest.json:
    format "nanogpt2-token-shards", format_version 1
    complete               true once every shard is written; training refuses a folder where it is false
    tokenizer "gpt2", eot_token 50256, shard_format {magic, version, header_bytes, dtype}
    input                  the --input path as given (informational)
    job                    what determines the bytes written, compared on every re-run:
                           sources [{path (relative to --input), kind "text" | "jsonl", bytes, sha256}],
                           text_field, val_fraction, shard_tokens, chunk_bytes
    source_mtimes          {path: mtime_ns}: a source whose size and mtime are unchanged is not hashed again
    val_start              {source, byte}: where the val split begins (null without one)
    splits.train, .val     shards [{file, tokens, documents, max_token}], tokens, documents (= end-of-text
                           tokens), units (work units planned), resume {unit, skip}, done

Resuming. Every shard is written under a temporary name, flushed to disk and renamed when complete; then the
manifest (also replaced atomically) lists it together with the resume point: the work unit, and the tokens
of that unit already written, where the next shard begins. An interrupted run (Ctrl-C, a crash, a lost
machine) leaves only complete shards behind the manifest; running the same command again deletes leftover
temporary files and continues from the resume point. Work units are fixed by the job, not by --workers, so
the shards are identical whatever was interrupted and however many workers ran. Running a finished job again
checks its shards and does nothing. A changed source or option is refused with the difference named (write
to a new --out). A lock file keeps two runs from writing one folder.

Speed. The input is cut into units of --chunk-bytes (cut only where tokenizing the parts separately gives
exactly the tokens of the whole: see `next_cut`), tokenized by --workers processes (fork: each inherits the
tokenizer the parent built), and written in order by this process, with at most 2 units per worker in flight.
tiktoken encodes about 2.5 M tokens/s on a quiet core (tinyshakespeare); measured figures, this pipeline
against tiktoken's own rate, are in BENCHMARKS.md (benchmarks/prepare_data.py).
"""
from __future__ import annotations

import collections
import fcntl
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
from tqdm import tqdm

from nanogpt2.flags import dataclass_parser, flag
from nanogpt2.shards import (FORMAT, FORMAT_VERSION, HEADER_BYTES, MANIFEST, MAGIC, MAX_SHARD_TOKENS, SPLITS,
                             TOKEN_DTYPE, VERSION, encode_header, open_shard_folder, read_manifest, write_manifest)
from nanogpt2.tokenizer import EOT_ID, get_tokenizer

TEXT_SUFFIXES, JSONL_SUFFIXES = (".txt",), (".jsonl",)
_EOT = np.array([EOT_ID], dtype=np.uint32)
LOCK = ".lock"


@dataclass
class PrepareConfig:
    input: str = flag("a UTF-8 text file, a .jsonl file (one JSON object per line), or a folder searched "
                      "recursively for *.txt and *.jsonl files", default="")
    out: str = flag("folder for the shards and manifest.json (created; run the same command again to resume)",
                    default="")
    text_field: str = flag("JSONL: the field holding each document's text", default="text")
    val_fraction: float = flag("hold out the last fraction of the input bytes as the val split (cut at a line or "
                               "document boundary); 0 = no val split", default=0.01)
    shard_tokens: int = flag("tokens per shard file (the last of a split holds the rest); llm.c's FineWeb shards "
                             "hold 10**8", default=100_000_000)
    chunk_bytes: int = flag("bytes of input per work unit; part of the job (a resumed run must keep it)",
                            default=1 << 18)
    workers: Optional[int] = flag("tokenizer processes (default: the CPUs this process may run on)", default=None)
    progress: bool = flag("show a progress bar on stderr (when it is a terminal)", default=True)

    def __post_init__(self):
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if not 1 <= self.shard_tokens <= MAX_SHARD_TOKENS:
            raise ValueError(f"--shard-tokens must be in [1, {MAX_SHARD_TOKENS}] (the shard header's int32 count), "
                             f"got {self.shard_tokens}")
        if self.chunk_bytes < 1:
            raise ValueError(f"--chunk-bytes must be >= 1, got {self.chunk_bytes}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1, got {self.workers}")


class BadInput(ValueError):
    """Input that cannot be tokenized: the file, the byte offset, what is wrong. Raised in a worker (its args
    pickle back to the parent), given a line number by the parent (line_of)."""

    def __init__(self, path: str, offset: int, what: str):
        super().__init__(path, offset, what)
        self.path, self.offset, self.what = path, offset, what

    def __str__(self):
        return f"{self.path}, byte {self.offset}: {self.what}"


def line_of(path: str, offset: int) -> int:
    """The 1-based line number of byte `offset` in a file (counted only when reporting an error)."""
    n, pos = 1, 0
    with open(path, "rb") as f:
        while pos < offset:
            block = f.read(min(1 << 20, offset - pos))
            if not block:
                break
            n += block.count(b"\n")
            pos += len(block)
    return n


# ---- sources ----------------------------------------------------------------------------------------

class Source(NamedTuple):
    path: str        # where it is
    rel: str         # its name in the manifest: relative to --input (a single file: its base name)
    kind: str        # "text" (one document) | "jsonl" (one document per line)
    size: int        # bytes
    mtime_ns: int


def _kind(name: str) -> str:
    return "jsonl" if name.lower().endswith(JSONL_SUFFIXES) else "text"


def find_sources(path: str) -> list[Source]:
    """The input files, in the order their tokens are written. A missing path, a folder without *.txt or
    *.jsonl files, or a corpus of 0 bytes is a ValueError (FileNotFoundError) saying what was found."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path!r} does not exist: pass a UTF-8 text file, a .jsonl file or a "
                                f"folder of *.txt / *.jsonl files")
    if os.path.isfile(path):
        st = os.stat(path)
        sources = [Source(path, os.path.basename(path), _kind(path), st.st_size, st.st_mtime_ns)]
    else:
        found, others = [], []
        for root, dirs, files in os.walk(path):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in files:
                full = os.path.join(root, name)
                if name.startswith("."):
                    continue
                if name.lower().endswith(TEXT_SUFFIXES + JSONL_SUFFIXES):
                    found.append(full)
                else:
                    others.append(os.path.relpath(full, path))
        if not found:
            seen = f"; it has {len(others)} other files ({', '.join(sorted(others)[:5])}{', ...' if len(others) > 5 else ''})" \
                if others else "; it is empty"
            raise ValueError(f"--input folder {path!r} has no text files (*.txt) or JSONL files (*.jsonl){seen}")
        sources = []
        for full in sorted(found, key=lambda p: os.path.relpath(p, path)):
            st = os.stat(full)
            sources.append(Source(full, os.path.relpath(full, path), _kind(full), st.st_size, st.st_mtime_ns))
    if sum(s.size for s in sources) == 0:
        raise ValueError(f"--input {path!r}: the corpus is empty ({len(sources)} file{'s' * (len(sources) != 1)}, "
                         f"0 bytes)")
    return sources


def sha256_of(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_sources(sources: list[Source], previous: Optional[dict], progress: bool) -> dict[str, str]:
    """{rel: sha256}: a source whose size and mtime match the previous manifest's keeps its recorded hash
    (so resuming or re-running a finished job reads nothing); the others are read once (~1 GB/s, far
    faster than tokenizing)."""
    old_sha, old_mtime, old_size = {}, {}, {}
    if previous:
        old_mtime = previous.get("source_mtimes", {})
        for s in previous["job"]["sources"]:
            old_sha[s["path"]], old_size[s["path"]] = s["sha256"], s["bytes"]
    hashes, todo = {}, []
    for s in sources:
        if s.rel in old_sha and old_size[s.rel] == s.size and old_mtime.get(s.rel) == s.mtime_ns:
            hashes[s.rel] = old_sha[s.rel]
        else:
            todo.append(s)
    with tqdm(total=sum(s.size for s in todo), unit="B", unit_scale=True, desc="hashing",
              disable=None if progress else True) as bar:     # None: shown on a terminal only
        for s in todo:
            hashes[s.rel] = sha256_of(s.path)
            bar.update(s.size)
    return hashes


def job_of(cfg: PrepareConfig, sources: list[Source], hashes: dict[str, str]) -> dict:
    """What determines the bytes written: re-running with the same job continues or does nothing."""
    return {"sources": [{"path": s.rel, "kind": s.kind, "bytes": s.size, "sha256": hashes[s.rel]} for s in sources],
            "text_field": cfg.text_field, "val_fraction": cfg.val_fraction, "shard_tokens": cfg.shard_tokens,
            "chunk_bytes": cfg.chunk_bytes}


def job_differences(old: dict, new: dict) -> list[str]:
    """What changed between two jobs, as flags and file names a user recognises."""
    diff = [f"--{k.replace('_', '-')} {old.get(k)!r} (now {new[k]!r})" for k in new if k != "sources"
            and old.get(k) != new[k]]
    before = {s["path"]: s for s in old["sources"]}
    after = {s["path"]: s for s in new["sources"]}
    for p in sorted(before.keys() | after.keys()):
        if p not in after:
            diff.append(f"{p} is gone")
        elif p not in before:
            diff.append(f"{p} is new")
        elif before[p] != after[p]:
            diff.append(f"{p} changed ({before[p]['bytes']:,} -> {after[p]['bytes']:,} bytes, sha256 "
                        f"{before[p]['sha256'][:12]} -> {after[p]['sha256'][:12]})")
    return diff


# ---- where text may be cut ----------------------------------------------------------------------------

# GPT-2's pre-tokenizer (nanogpt2.tokenizer.PAT_STR) never joins a lone ASCII whitespace character that sits
# between two printable ASCII characters to the text before it: every piece that contains a non-space ends
# before whitespace, and `\s+(?!\S)` / `\s++$` need a whitespace run, which a single character followed by a
# printable one is not (`\s` takes it alone, or ` ?\p{L}++` etc. start with it). So cutting just before such a
# character gives two texts whose tokens, concatenated, are the tokens of the whole (tests check this on
# random text). Only ASCII bytes are tested, so a cut never splits a UTF-8 character, and Unicode spaces
# (U+00A0, U+3000, which `\s` matches too) are never mistaken for printable.
_TEXT_CUT = re.compile(rb"(?<=[\x21-\x7e])(?=[\t\n\x0b\x0c\r ][\x21-\x7e])")


def next_cut(f, pos: int, limit: int, kind: str) -> int:
    """The first byte offset >= pos (and < limit) where the open file `f` may be cut: a JSONL line start, or in
    text a _TEXT_CUT; `limit` (the end of the part being cut) if there is none. Offset 0 always is one.
    Reads a window after pos, doubling it until a cut turns up (natural text has one within a few bytes)."""
    if pos <= 0 or pos >= limit:
        return max(0, min(pos, limit))
    window = 1 << 12
    while True:
        lo, end = pos - 1, min(limit, pos + window)   # one byte of look-behind, one of look-ahead past `end`
        f.seek(lo)
        buf = f.read(end + 1 - lo)
        if kind == "jsonl":
            j = buf.find(b"\n", 0, end - lo)            # a "\n" at lo .. end-1 starts a line at lo+j+1 <= end
            cut = lo + j + 1 if j >= 0 else None
        else:
            m = _TEXT_CUT.search(buf, 1)
            cut = lo + m.start() if m and lo + m.start() < end else None
        if cut is not None:
            return min(cut, limit)
        if end >= limit:
            return limit
        window *= 2


# ---- the plan: work units ---------------------------------------------------------------------------

class Piece(NamedTuple):
    """Bytes [start, stop) of one source, nominally: a bound marked `snap` moves to next_cut(bound) (below
    `limit`, the end of its part of the file), so the unit before and the unit after agree on it."""
    path: str
    kind: str
    start: int
    stop: int
    limit: int
    snap_start: bool
    snap_stop: bool


class Unit(NamedTuple):
    split: str
    index: int               # within its split: the resume point counts units
    pieces: tuple            # of Piece
    nbytes: int              # nominal input bytes (for the progress bar)


def val_start(sources: list[Source], val_fraction: float) -> Optional[tuple[int, int]]:
    """(source index, byte) where the val split begins: the first cut at or after the last val_fraction of the
    input bytes (None: no val split). A fraction too small to reach a cut is a ValueError saying what works."""
    if val_fraction == 0:
        return None
    total = sum(s.size for s in sources)
    held = int(round(total * val_fraction))
    target, at = total - held, 0
    for i, s in enumerate(sources):
        if target < at + s.size:
            with open(s.path, "rb") as f:
                cut = next_cut(f, target - at, s.size, s.kind)
            if cut < s.size:
                return i, cut
            target = at + s.size           # no cut left in this file: the next non-empty file's start
        at += s.size
    raise ValueError(f"--val-fraction {val_fraction} holds out the last {held:,} of the input's {total:,} bytes, "
                     f"where there is no line break or document start to begin a val split at: use a larger "
                     f"--val-fraction, or 0 for no val split")


def plan(sources: list[Source], cfg: PrepareConfig) -> tuple[dict[str, list[Unit]], Optional[tuple[int, int]]]:
    """Each split's work units, in order, and where val begins. A file's part is cut into pieces of
    chunk_bytes; consecutive pieces (small files) are grouped until a unit holds chunk_bytes."""
    cut = val_start(sources, cfg.val_fraction)
    segments = {"train": [], "val": []}       # (source, start, stop): a split's bytes
    for i, s in enumerate(sources):
        if s.size == 0:
            continue
        if cut is None or i < cut[0]:
            segments["train"].append((s, 0, s.size))
        elif i > cut[0]:
            segments["val"].append((s, 0, s.size))
        else:
            if cut[1] > 0:
                segments["train"].append((s, 0, cut[1]))
            segments["val"].append((s, cut[1], s.size))
    units = {}
    for split, segs in segments.items():
        units[split], pieces, nbytes = [], [], 0
        for s, a, b in segs:
            for lo in range(a, b, cfg.chunk_bytes):
                hi = min(b, lo + cfg.chunk_bytes)
                pieces.append(Piece(s.path, s.kind, lo, hi, b, lo != a, hi != b))
                nbytes += hi - lo
                if nbytes >= cfg.chunk_bytes:
                    units[split].append(Unit(split, len(units[split]), tuple(pieces), nbytes))
                    pieces, nbytes = [], 0
        if pieces:
            units[split].append(Unit(split, len(units[split]), tuple(pieces), nbytes))
    return units, cut


# ---- a worker: one unit -> tokens ---------------------------------------------------------------------

def _jsonl_texts(raw: bytes, path: str, offset: int, field: str) -> Iterator[str]:
    """The documents of whole JSONL lines `raw` (starting at byte `offset` of `path`); blank lines skipped."""
    pos = 0
    for line in raw.split(b"\n"):
        at, pos = offset + pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as e:   # JSONDecodeError, or UnicodeDecodeError on bytes that are not UTF-8
            raise BadInput(path, at, f"not a JSON object ({e})") from None
        if not isinstance(record, dict):
            raise BadInput(path, at, f"a JSON {type(record).__name__}, not an object with a {field!r} field")
        if field not in record:
            keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
            raise BadInput(path, at, f"no {field!r} field (its fields: {keys}); pass --text-field NAME")
        text = record[field]
        if not isinstance(text, str):
            raise BadInput(path, at, f"field {field!r} is a JSON {type(text).__name__}, not a string")
        if text:
            yield text


def encode(enc, text: str) -> np.ndarray:
    """GPT-2 tokens of `text` read as ordinary text, (N,) uint32. tiktoken >= 0.8's encode_to_numpy skips the
    Python list encode_ordinary builds (~15% faster here); with no special token allowed and none disallowed,
    it encodes exactly as encode_ordinary ("<|endoftext|>" in the text stays text)."""
    if hasattr(enc, "encode_to_numpy"):
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
    return np.array(enc.encode_ordinary(text), dtype=np.uint32)


def tokenize_unit(pieces: tuple, text_field: str) -> np.ndarray:
    """A unit's tokens (N,) uint16, the end-of-text token before each document that starts in it.
    Deterministic: the same pieces give the same tokens in any process."""
    enc = get_tokenizer()
    parts: list[np.ndarray] = []
    for p in pieces:
        with open(p.path, "rb") as f:
            start = next_cut(f, p.start, p.limit, p.kind) if p.snap_start else p.start
            stop = next_cut(f, p.stop, p.limit, p.kind) if p.snap_stop else p.stop
            if start >= stop:
                continue                       # the unit before reached past this piece: nothing left in it
            f.seek(start)
            raw = f.read(stop - start)
        if p.kind == "jsonl":
            for text in _jsonl_texts(raw, p.path, start, text_field):
                parts += [_EOT, encode(enc, text)]
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(p.path, start + e.start, f"not UTF-8 text ({e.reason}: byte "
                                                    f"0x{raw[e.start]:02x})") from None
        if start == 0:
            parts.append(_EOT)                 # a text file is one document; it starts here
        parts.append(encode(enc, text))
    return np.concatenate(parts).astype(TOKEN_DTYPE) if parts else np.empty(0, TOKEN_DTYPE)


def _quiet_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: no traceback per worker


def tokenized(units: list[Unit], text_field: str, workers: int) -> Iterator[tuple[Unit, np.ndarray]]:
    """(unit, its tokens) in order, tokenized by `workers` processes, at most 2 units per worker in flight
    (so memory stays bounded however slow one unit is); in this process when workers == 1."""
    if workers == 1:
        for u in units:
            yield u, tokenize_unit(u.pieces, text_field)
        return
    get_tokenizer()  # built once here (cached); the forked workers inherit it (spawn would rebuild it in each)
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    with ctx.Pool(workers, initializer=_quiet_worker) as pool:
        window = collections.deque()
        for u in units:
            window.append((u, pool.apply_async(tokenize_unit, (u.pieces, text_field))))
            if len(window) >= 2 * workers:
                head, result = window.popleft()
                yield head, result.get()
        while window:
            head, result = window.popleft()
            yield head, result.get()


# ---- writing shards -------------------------------------------------------------------------------------

class ShardWriter:
    """Appends one split's token stream to shards of shard_tokens tokens: `<split>_<index:06d>.bin`, written
    as `.tmp` and renamed when full (or when the split ends); each completed shard is recorded, with the
    resume point after it, in `record` (the manifest's entry for the split) and `on_shard` saves the manifest."""

    def __init__(self, folder: str, split: str, shard_tokens: int, record: dict, on_shard):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.record, self.on_shard = record, on_shard
        self.file, self.n, self.max_token, self.documents = None, 0, -1, 0

    def _name(self) -> str:
        return f"{self.split}_{len(self.record['shards']):06d}.bin"

    def add(self, unit: int, tokens: np.ndarray, skip: int = 0) -> None:
        """Tokens of work unit `unit`, from token `skip` on (a resumed unit's first part is in a shard already)."""
        pos = skip
        while pos < len(tokens):
            if self.file is None:
                self.file = open(os.path.join(self.folder, self._name() + ".tmp"), "wb")
                self.file.write(encode_header(0))          # the count is filled in when the shard is complete
                self.n, self.max_token, self.documents = 0, -1, 0
            part = tokens[pos: pos + self.shard_tokens - self.n]
            self.file.write(part.astype(TOKEN_DTYPE, copy=False).tobytes())
            self.n += len(part)
            self.max_token = max(self.max_token, int(part.max()))
            self.documents += int(np.count_nonzero(part == EOT_ID))
            pos += len(part)
            if self.n == self.shard_tokens:
                self._complete(*((unit, pos) if pos < len(tokens) else (unit + 1, 0)))

    def finish(self, n_units: int) -> None:
        """The split's last tokens are in: complete the partial shard, mark the split done."""
        if self.file is not None:
            self._complete(n_units, 0)
        self.record["resume"], self.record["done"] = {"unit": n_units, "skip": 0}, True
        self.on_shard()

    def _complete(self, next_unit: int, next_skip: int) -> None:
        name = self._name()
        self.file.seek(0)
        self.file.write(encode_header(self.n))
        self.file.flush()
        os.fsync(self.file.fileno())                     # on disk before its name says it is complete
        self.file.close()
        self.file = None
        os.replace(os.path.join(self.folder, name + ".tmp"), os.path.join(self.folder, name))
        self.record["shards"].append({"file": name, "tokens": self.n, "documents": self.documents,
                                      "max_token": self.max_token})
        self.record["tokens"] += self.n
        self.record["documents"] += self.documents
        self.record["resume"] = {"unit": next_unit, "skip": next_skip}
        self.on_shard()

    def abandon(self) -> None:
        """Drop the shard in progress (an error or Ctrl-C): its tokens are written again on resume."""
        if self.file is not None:
            path = self.file.name
            self.file.close()
            self.file = None
            os.remove(path)


# ---- the job --------------------------------------------------------------------------------------------

def new_manifest(cfg: PrepareConfig, job: dict, sources: list[Source], units: dict, cut) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
            "tokenizer": "gpt2", "eot_token": EOT_ID,
            "shard_format": {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "dtype": "uint16"},
            "input": cfg.input, "job": job, "source_mtimes": {s.rel: s.mtime_ns for s in sources},
            "val_start": None if cut is None else {"source": sources[cut[0]].rel, "byte": cut[1]},
            "splits": {split: {"shards": [], "tokens": 0, "documents": 0, "units": len(units[split]),
                               "resume": {"unit": 0, "skip": 0}, "done": False} for split in SPLITS}}


def summary(manifest: dict) -> str:
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    return (f"{tr['tokens']:,} train tokens ({tr['documents']:,} documents, {len(tr['shards'])} shards), "
            f"{va['tokens']:,} val tokens ({va['documents']:,} documents, {len(va['shards'])} shards)")


def lock(folder: str):
    """An exclusive lock on the folder for this run (released when the process exits)."""
    f = open(os.path.join(folder, LOCK), "a")   # "a": no truncation, so a run that finds nothing to do changes nothing
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise RuntimeError(f"another tools/prepare_data.py is writing {folder} (it holds {LOCK}): wait for it, "
                           f"or write to another --out") from None
    return f


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Run (or resume, or confirm) the job; return the complete manifest."""
    if not cfg.out:
        raise ValueError("--out is required: the folder to write the shards into")
    sources = find_sources(cfg.input)
    os.makedirs(cfg.out, exist_ok=True)
    held = lock(cfg.out)
    try:
        previous = read_manifest(cfg.out) if os.path.isfile(os.path.join(cfg.out, MANIFEST)) else None
        if previous is None and set(os.listdir(cfg.out)) - {LOCK}:
            raise ValueError(f"--out {cfg.out!r} is not empty and has no {MANIFEST}: write to a new or empty folder")
        hashes = hash_sources(sources, previous, cfg.progress)
        job = job_of(cfg, sources, hashes)
        if previous is not None and previous["job"] != job:
            raise ValueError(f"--out {cfg.out!r} holds another job: " + "; ".join(job_differences(previous["job"], job))
                             + ". Write to a new --out (or delete this one to start over)")
        if previous is not None and previous["complete"]:
            open_shard_folder(cfg.out)  # every shard still there, whole
            log(f"{cfg.out} is complete already: {summary(previous)}; nothing to do")
            return previous
        return run_job(cfg, sources, job, previous, log)
    finally:
        held.close()


def run_job(cfg: PrepareConfig, sources: list[Source], job: dict, previous: Optional[dict], log) -> dict:
    units, cut = plan(sources, cfg)
    manifest = previous or new_manifest(cfg, job, sources, units, cut)
    manifest["source_mtimes"] = {s.rel: s.mtime_ns for s in sources}
    for name in os.listdir(cfg.out):                  # an interrupted run's unfinished shard
        if ".tmp" in name:
            os.remove(os.path.join(cfg.out, name))
    write_manifest(cfg.out, manifest)
    save = lambda: write_manifest(cfg.out, manifest)  # noqa: E731
    writers = {split: ShardWriter(cfg.out, split, cfg.shard_tokens, manifest["splits"][split], save)
               for split in SPLITS}
    start = {split: dict(manifest["splits"][split]["resume"]) for split in SPLITS}  # where this run begins
    todo = [u for split in SPLITS for u in units[split][start[split]["unit"]:]]
    resumed = previous is not None and sum(manifest["splits"][s]["tokens"] for s in SPLITS) > 0
    workers = cfg.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    workers = max(1, min(workers, len(todo)))         # no idle processes for a small job
    if resumed:
        log(f"resuming {cfg.out}: {summary(manifest)} written; {len(todo)} of "
            f"{sum(len(units[s]) for s in SPLITS)} work units to go")
    get_tokenizer()                                   # ~1 s to build, once: not part of the tokenizing rate
    t0, n_tokens = time.perf_counter(), 0
    bar = tqdm(total=sum(u.nbytes for u in todo), unit="B", unit_scale=True, desc="tokenizing",
               disable=None if cfg.progress else True, file=sys.stderr)
    try:
        current = None
        for unit, tokens in tokenized(todo, cfg.text_field, workers):
            if unit.split != current:                # train's units all came: its last shard can close
                if current is not None:
                    writers[current].finish(len(units[current]))
                current = unit.split
            skip = start[unit.split]["skip"] if unit.index == start[unit.split]["unit"] else 0
            writers[unit.split].add(unit.index, tokens, skip)
            n_tokens += len(tokens)
            bar.update(unit.nbytes)
            bar.set_postfix_str(f"{n_tokens / (time.perf_counter() - t0) / 1e6:.2f}M tokens/s", refresh=False)
        for split in SPLITS:                         # splits with no unit left (or none at all) end here
            if not manifest["splits"][split]["done"]:
                writers[split].finish(len(units[split]))
    except BadInput as e:
        raise ValueError(f"{e.path}, line {line_of(e.path, e.offset)}: {e.what}") from None
    finally:
        bar.close()
        for w in writers.values():
            w.abandon()
    seconds = time.perf_counter() - t0
    if manifest["splits"]["train"]["tokens"] == 0:
        raise ValueError(f"--input {cfg.input!r} holds no text to train on (every document is empty)")
    manifest["complete"] = True
    write_manifest(cfg.out, manifest)
    log(f"{cfg.out}: {summary(manifest)}; tokenized {n_tokens:,} tokens in {seconds:.2f} s "
        f"({n_tokens / max(seconds, 1e-9) / 1e6:.2f} M tokens/s, {workers} worker{'s' * (workers != 1)})")
    return manifest


def main(argv=None) -> int:
    parser = dataclass_parser(PrepareConfig, "tools/prepare_data.py", __doc__.split("\n")[0],
                              required=("input", "out"))
    try:
        cfg = PrepareConfig(**vars(parser.parse_args(argv)))
        prepare(cfg)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the shards listed in {MANIFEST} are complete; run the same command again to "
              f"resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
