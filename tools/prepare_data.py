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
first place at or after that point where the input may be cut (the next JSONL line; in a text file, the next
place `_cut_here` allows, so a document can straddle the split; the start of the next file if there is none).
Deterministic: the same input and options give the same split.

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
    plan_version           how the input was cut into work units (PLAN_VERSION; absent: 1)
    val_start              {source, byte}: where the val split begins (null without one)
    splits.train, .val     shards [{file, tokens, documents, max_token}], tokens, documents (= end-of-text
                           tokens), units (work units planned), resume {unit, skip}, done

Resuming. Every shard is written under a temporary name, flushed to disk and renamed when complete; then the
manifest (also replaced atomically) lists it together with the resume point: the work unit, and the tokens
of that unit already written, where the next shard begins. An interrupted run (Ctrl-C, a crash, a lost
machine) leaves only complete shards behind the manifest; running the same command again deletes leftover
temporary files and continues from the resume point. Work units are fixed by the job and the plan version, not
by --workers, so the shards are identical whatever was interrupted and however many workers ran; an
unfinished folder from a version that cuts units differently is refused, not resumed at the wrong unit.
Running a finished job again checks its shards and does nothing (if the sources were only touched, it records
their new mtimes, so the next run does not hash them again). A changed source or option is refused with the
difference named (write to a new --out). A lock file keeps two runs from writing one folder.

Work units and memory. plan() walks each file once, before tokenizing, and cuts it into pieces of about
--chunk-bytes, each ending only where tokenizing the two sides apart gives exactly the tokens of the whole
(`_cut_here`: before a lone ASCII space, tab or newline between non-spaces, or where letters, digits and
punctuation meet, so Chinese or Japanese text without spaces is cut too); small files are grouped into one unit.
A piece of text is at most 4 x --chunk-bytes (MAX_PIECE): text with no such place in that stretch (a megabyte
of digits, say) stops the job, naming the file and line, rather than becoming one piece of unbounded size. A
JSONL line is never split: a unit holds each of its lines whole. Units are tokenized by --workers processes
(fork: each inherits the tokenizer the parent built) and written in order by this process, at most 2 units per
worker in flight. So the memory in use is bounded by 2 x workers units, each under 5 x --chunk-bytes of text
(or its JSONL lines, however long) and its tokens, plus the plan, one small record per unit: it grows with
the corpus only by those records. Speed: 1.33 M tokens/s with 2 workers on the 2-core development
machine while it ran other jobs, against tiktoken's own 1.13 M/s on the same pieces (BENCHMARKS.md,
benchmarks/prepare_data.py).
"""
from __future__ import annotations

import collections
import fcntl
import functools
import hashlib
import json
import multiprocessing
import os
import re
import signal
import sys
import time
import unicodedata
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional

import numpy as np
from tqdm import tqdm

from nanogpt2.flags import dataclass_parser, flag
from nanogpt2.shards import (FORMAT, FORMAT_VERSION, HEADER_BYTES, MANIFEST, MAGIC, MAX_SHARD_TOKENS, SPLITS,
                             TOKEN_DTYPE, VERSION, ShardFile, open_shard_folder, read_manifest, write_manifest)
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


# ---- where the input may be cut -----------------------------------------------------------------------

# Work units are tokenized separately, so a unit may end only where tokenizing the two sides apart gives exactly
# the tokens of the whole. GPT-2's pre-tokenizer (nanogpt2.tokenizer.PAT_STR)
#     '(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s
# splits text into pieces, and BPE merges within a piece only. A cut between code points X and Y keeps every
# piece when, in the whole text, the piece holding X ends at X: the left side alone then splits as the whole did
# (X is not whitespace, so `\s++$` and `(?!\S)` decide as they did), and the right side starts matching where
# the whole did, on the same text. The piece holding a non-space X ends at X when
#   1. Y is whitespace: a piece holding a non-space holds no whitespace after it (` ?` is a leading space). We cut
#      only before a single ASCII whitespace byte whose neighbours X and Z are not whitespace (" ", "\n", "\t"
#      between words), X and Z decoded, so that U+00A0 or U+3000 beside it count as whitespace; or
#   2. X and Y are letter (\p{L}), number (\p{N}) or other (neither, nor whitespace), in different classes, and X
#      is not "'": ` ?\p{L}++`, ` ?\p{N}++` and ` ?[^\s\p{L}\p{N}]++` each stop at a change of class, and a
#      contraction ('s, 'll, ...) starts with "'" and holds only letters after it. This cuts text without
#      spaces: "日本語。" into "日本語" and "。", minified code at its punctuation.
# The classes come from Python's Unicode tables (unicodedata); tiktoken's regex has its own, of another Unicode
# version, so there is no cut beside a code point unassigned in Unicode 3.2 or of another class there
# (unicodedata.ucd_3_2_0). tests/test_prepare_data.py checks every cut these rules allow in random text.
_ASCII_SPACE = b"\t\n\x0b\x0c\r "
# Every place the rules allow, and more, found at C speed; _cut_here decides each. ASCII bytes are space-like
# ([\t-\r\x1c-\x20], str.isspace), letters, digits or other (_ASCII_OTHER).
_ASCII_OTHER = rb"\x00-\x08\x0e-\x1b\x21-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f"
_NOT_QUOTE = _ASCII_OTHER.replace(rb"\x21-\x2f", rb"\x21-\x26\x28-\x2f")   # other, less "'" (0x27)
_CANDIDATE = re.compile(
    rb"(?=[\t\n\x0b\x0c\r ])"                                            # rule 1
    rb"|(?<=[\x80-\xff])(?=[^\x80-\xbf])|(?=[\xc0-\xff])"                 # beside a non-ASCII code point
    rb"|(?<=[A-Za-z])(?=[0-9" + _ASCII_OTHER + rb"])|(?<=[0-9])(?=[A-Za-z" + _ASCII_OTHER + rb"])"   # rule 2
    rb"|(?<=[" + _NOT_QUOTE + rb"])(?=[A-Za-z0-9])")


def _code_point_before(buf: bytes, i: int) -> Optional[str]:
    """The UTF-8 code point ending just before byte i (None: none, or not valid UTF-8)."""
    j = i - 1
    while j > 0 and i - j < 4 and 0x80 <= buf[j] < 0xC0:   # continuation bytes: walk back to the lead byte
        j -= 1
    try:
        return buf[j:i].decode("utf-8")
    except UnicodeDecodeError:
        return None


def _code_point_at(buf: bytes, i: int) -> Optional[str]:
    """The UTF-8 code point starting at byte i (None: none, or not valid UTF-8)."""
    if i >= len(buf):
        return None
    lead = buf[i]
    n = 1 if lead < 0x80 else 2 if lead >= 0xC0 and lead < 0xE0 else 3 if 0xE0 <= lead < 0xF0 else 4
    try:
        return buf[i:i + n].decode("utf-8")
    except UnicodeDecodeError:
        return None


@functools.lru_cache(maxsize=1 << 16)
def _class(ch: str) -> Optional[str]:
    """"L", "N" or "O" (other), as rule 2 sees a code point; None for whitespace and for code points whose class
    tiktoken's tables might not share (unassigned in Unicode 3.2, or of another class there)."""
    if ch.isspace():                 # a superset of the regex's \s (White_Space): also \x1c-\x1f
        return None
    now, then = unicodedata.category(ch), unicodedata.ucd_3_2_0.category(ch)
    if then in ("Cn", "Co", "Cs"):
        return None
    kind = {"L": "L", "N": "N"}.get(now[0], "O")
    return kind if kind == {"L": "L", "N": "N"}.get(then[0], "O") else None


def _cut_here(buf: bytes, i: int) -> bool:
    """Whether text may be cut just before byte i of `buf` (rules 1 and 2 above; buf holds the text around i)."""
    x, y = _code_point_before(buf, i), _code_point_at(buf, i)
    if x is None or y is None:
        return False
    if buf[i] in _ASCII_SPACE:                               # rule 1
        z = _code_point_at(buf, i + 1)
        return z is not None and not x.isspace() and not z.isspace()
    cx, cy = _class(x), _class(y)                            # rule 2
    return cx is not None and cy is not None and cx != cy and x != "'"


def text_cuts(buf: bytes, start: int = 1, stop: Optional[int] = None) -> Iterator[int]:
    """Every offset i, start <= i < stop, where the text `buf` may be cut (in order)."""
    stop = len(buf) if stop is None else stop
    for m in _CANDIDATE.finditer(buf, max(1, start)):
        if m.start() >= stop:
            return
        if _cut_here(buf, m.start()):
            yield m.start()


def find_cut(f, lo: int, hi: int, kind: str) -> Optional[int]:
    """The first offset c, lo <= c < hi (lo >= 1), where the open file `f` may be cut: in JSONL the start of a
    line, in text a place text_cuts allows; None if there is none. Reads [lo, c] and a few bytes around, in
    blocks that grow from 4 KiB: what it reads is about c - lo, never the rest of the file."""
    block = 1 << 12
    while lo < hi:
        end = min(hi, lo + block)
        back = min(lo, 4)                     # a UTF-8 code point before lo (at most 4 bytes)
        f.seek(lo - back)
        buf = f.read(back + (end - lo) + 8)   # and the code points at and after the last offset tested (Y, Z)
        if kind == "jsonl":
            j = buf.find(b"\n", back - 1, back - 1 + end - lo)   # a "\n" at lo-1 .. end-2: a line starts at lo .. end-1
            if j >= 0:
                return lo - back + j + 1
        else:
            for c in text_cuts(buf, back, back + end - lo):
                return lo - back + c
        lo, block = end, min(block * 2, 1 << 20)
    return None


# ---- the plan: work units ---------------------------------------------------------------------------

MAX_PIECE = 4            # a piece of text is at most MAX_PIECE * --chunk-bytes: the cap on what a worker holds
PLAN_VERSION = 2         # manifest["plan_version"]: how units are cut (1: cuts found by the workers, ASCII only)


class Piece(NamedTuple):
    """Bytes [start, stop) of one source: both ends are places where it may be cut (or its ends)."""
    path: str
    kind: str
    start: int
    stop: int


class Unit(NamedTuple):
    split: str
    index: int               # within its split: the resume point counts units
    pieces: tuple            # of Piece
    nbytes: int              # input bytes (for the progress bar)


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
            if target == at:                 # a file's start is always a cut
                return i, 0
            with open(s.path, "rb") as f:
                cut = find_cut(f, target - at, s.size, s.kind)
            if cut is not None:
                return i, cut
            target = at + s.size           # no cut left in this file: the next non-empty file's start
        at += s.size
    raise ValueError(f"--val-fraction {val_fraction} holds out the last {held:,} of the input's {total:,} bytes, "
                     f"where there is no line break or document start to begin a val split at: use a larger "
                     f"--val-fraction, or 0 for no val split")


def pieces_of(s: Source, a: int, b: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    """Bytes [a, b) of source s (a and b places it may be cut) as consecutive pieces of about chunk_bytes, walking
    the file once: each piece ends at the first cut at least chunk_bytes past its start. A JSONL line is never
    split (a piece may hold a long one whole); a piece of text is at most MAX_PIECE * chunk_bytes, and text with
    no cut in that stretch is a ValueError naming the file and byte (no safe place to cut: it would be one piece
    of unbounded size)."""
    with open(s.path, "rb") as f:
        p = a
        while p < b:
            target = p + chunk_bytes
            cap = b if s.kind == "jsonl" else min(b, p + MAX_PIECE * chunk_bytes)
            c = find_cut(f, target, cap + 1, s.kind) if target < b else b
            if c is None:
                if cap < b:
                    raise ValueError(f"{s.path}, line {line_of(s.path, target)}: no place to cut the text in bytes "
                                     f"{target:,} .. {cap:,} (no whitespace between non-spaces, no change between "
                                     f"letters, digits and punctuation), and a piece may hold at most {MAX_PIECE} x "
                                     f"--chunk-bytes = {MAX_PIECE * chunk_bytes:,} bytes: pass a larger --chunk-bytes")
                c = b
            yield p, c
            p = c


def plan(sources: list[Source], cfg: PrepareConfig) -> tuple[dict[str, list[Unit]], Optional[tuple[int, int]]]:
    """Each split's work units, in order, and where val begins: every cut is found here, once (pieces_of), and
    a unit holds concrete byte ranges. Consecutive pieces (small files) are grouped until a unit holds
    chunk_bytes, so a unit has under (1 + MAX_PIECE) * chunk_bytes of text."""
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
            for lo, hi in pieces_of(s, a, b, cfg.chunk_bytes):
                pieces.append(Piece(s.path, s.kind, lo, hi))
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
            f.seek(p.start)
            raw = f.read(p.stop - p.start)
        if p.kind == "jsonl":
            for text in _jsonl_texts(raw, p.path, p.start, text_field):
                parts += [_EOT, encode(enc, text)]
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadInput(p.path, p.start + e.start,
                           f"not UTF-8 text ({e.reason}: byte 0x{raw[e.start]:02x})") from None
        if p.start == 0:
            parts.append(_EOT)                 # a text file is one document; it starts here
        parts.append(encode(enc, text))
    return np.concatenate(parts).astype(TOKEN_DTYPE) if parts else np.empty(0, TOKEN_DTYPE)


def _quiet_worker():
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: no traceback per worker


def tokenized(units: list[Unit], text_field: str, workers: int) -> Iterator[tuple[Unit, np.ndarray]]:
    """(unit, its tokens) in order, tokenized by `workers` processes, at most 2 units per worker in flight
    (however slow one unit is, no more queue up; each unit's size is bounded by plan()); in this process when
    workers == 1."""
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
    """Appends one split's token stream to shards of shard_tokens tokens, `<split>_<index:06d>.bin`, each a
    shards.ShardFile (written under a temporary name, renamed when full or when the split ends); each completed
    shard is recorded, with the resume point after it, in `record` (the manifest's entry for the split) and
    `on_shard` saves the manifest."""

    def __init__(self, folder: str, split: str, shard_tokens: int, record: dict, on_shard):
        self.folder, self.split, self.shard_tokens = folder, split, shard_tokens
        self.record, self.on_shard = record, on_shard
        self.shard: Optional[ShardFile] = None
        self.max_token, self.documents = -1, 0

    def _name(self) -> str:
        return f"{self.split}_{len(self.record['shards']):06d}.bin"

    def add(self, unit: int, tokens: np.ndarray, skip: int = 0) -> None:
        """Tokens of work unit `unit`, from token `skip` on (a resumed unit's first part is in a shard already)."""
        pos = skip
        while pos < len(tokens):
            if self.shard is None:
                self.shard = ShardFile(os.path.join(self.folder, self._name()))
                self.max_token, self.documents = -1, 0
            part = tokens[pos: pos + self.shard_tokens - self.shard.n]
            self.shard.append(part)
            self.max_token = max(self.max_token, int(part.max()))
            self.documents += int(np.count_nonzero(part == EOT_ID))
            pos += len(part)
            if self.shard.n == self.shard_tokens:
                self._complete(*((unit, pos) if pos < len(tokens) else (unit + 1, 0)))

    def finish(self, n_units: int) -> None:
        """The split's last tokens are in: complete the partial shard, mark the split done."""
        if self.shard is not None:
            self._complete(n_units, 0)
        self.record["resume"], self.record["done"] = {"unit": n_units, "skip": 0}, True
        self.on_shard()

    def _complete(self, next_unit: int, next_skip: int) -> None:
        name, n = self._name(), self.shard.n
        self.shard.close()
        self.shard = None
        self.record["shards"].append({"file": name, "tokens": n, "documents": self.documents,
                                      "max_token": self.max_token})
        self.record["tokens"] += n
        self.record["documents"] += self.documents
        self.record["resume"] = {"unit": next_unit, "skip": next_skip}
        self.on_shard()

    def abandon(self) -> None:
        """Drop the shard in progress (an error or Ctrl-C): its tokens are written again on resume."""
        if self.shard is not None:
            self.shard.abandon()
            self.shard = None


# ---- the job --------------------------------------------------------------------------------------------

def new_manifest(cfg: PrepareConfig, job: dict, sources: list[Source], units: dict, cut) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "complete": False,
            "tokenizer": "gpt2", "eot_token": EOT_ID,
            "shard_format": {"magic": MAGIC, "version": VERSION, "header_bytes": HEADER_BYTES, "dtype": "uint16"},
            "input": cfg.input, "job": job, "source_mtimes": mtimes_of(sources), "plan_version": PLAN_VERSION,
            "val_start": val_start_entry(sources, cut),
            "splits": {split: {"shards": [], "tokens": 0, "documents": 0, "units": len(units[split]),
                               "resume": {"unit": 0, "skip": 0}, "done": False} for split in SPLITS}}


def mtimes_of(sources: list[Source]) -> dict[str, int]:
    return {s.rel: s.mtime_ns for s in sources}


def val_start_entry(sources: list[Source], cut) -> Optional[dict]:
    return None if cut is None else {"source": sources[cut[0]].rel, "byte": cut[1]}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which taskset and container limits narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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
            if previous.get("source_mtimes") != mtimes_of(sources):  # touched, same sha256: record the new mtimes
                previous["source_mtimes"] = mtimes_of(sources)     # so that the next run hashes nothing again
                write_manifest(cfg.out, previous)
            log(f"{cfg.out} is complete already: {summary(previous)}; nothing to do")
            return previous
        if previous is not None and previous.get("plan_version", 1) != PLAN_VERSION:
            raise ValueError(f"--out {cfg.out!r} is an unfinished job that another version of tools/prepare_data.py "
                             f"started (work-unit plan {previous.get('plan_version', 1)}, this one plans "
                             f"{PLAN_VERSION}): its resume point counts units this version cuts differently. Finish "
                             f"it with that version, or delete the folder to start over")
        return run_job(cfg, sources, job, previous, log)
    finally:
        held.close()


def run_job(cfg: PrepareConfig, sources: list[Source], job: dict, previous: Optional[dict], log) -> dict:
    units, cut = plan(sources, cfg)
    manifest = previous or new_manifest(cfg, job, sources, units, cut)
    planned = {"units": {split: len(units[split]) for split in SPLITS}, "val_start": val_start_entry(sources, cut)}
    recorded = {"units": {split: manifest["splits"][split]["units"] for split in SPLITS},
                "val_start": manifest["val_start"]}
    if planned != recorded:   # same job, same plan version: cannot happen unless the planning code changed
        raise ValueError(f"--out {cfg.out!r}: this job's plan ({planned}) differs from the one its manifest records "
                         f"({recorded}), so its resume point would not mean the same bytes; delete the folder to "
                         f"start over")
    manifest["source_mtimes"] = mtimes_of(sources)
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
    workers = cfg.workers or available_cpus()
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
