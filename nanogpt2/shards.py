"""Token shards on disk: the file format and its one writer, a folder's manifest, and a reader that streams a folder.

tools/prepare_data.py writes these folders, each shard through ShardFile, the one writer of the format; training
reads them (nanogpt2.data wraps a ShardedTokens in a Split). AtomicFile, the temporary-file-then-rename that
ShardFile uses, is also how the manifest, data.py's token cache and checkpoint.py's training_state.pt are written.

One shard file (`train_000000.bin`, `val_000000.bin`, ...) is llm.c's GPT-2 token file, byte for byte
(llm.c dev/data/data_common.py `write_datafile`, read by llm.c's C `dataloader.h`), so llm.c can train on our
shards and we can read its FineWeb shards' tokens:

    offset  size         field
    0       4            magic    int32 little-endian, 20240520 (llm.c's "gpt-2" files)
    4       4            version  int32, 1 = uint16 tokens (llm.c's LLaMA-3 files use magic 20240801, version 7,
                                  uint32 tokens: refused here, GPT-2 has no ids above 50256)
    8       4            ntok     int32, number of tokens that follow (so < 2**31 per shard)
    12      1012         zeros    (the header is always 256 int32 = 1024 bytes)
    1024    2 * ntok     tokens   uint16 little-endian, GPT-2 ids in [0, 50257)

Unlike nanoGPT's headerless train.bin (data/openwebtext/prepare.py), a header says what the bytes are and how
many: a truncated copy (size != 1024 + 2 * ntok) or another format (magic) is caught before training on it.

The folder's `manifest.json` is what makes a folder a shard folder (is_shard_folder). It lists each split's
shards in order with their token counts, records the sources (paths, sizes, sha256) and options, and says
whether the job finished (`complete`): an unfinished folder is refused (run prepare_data again to finish it).
Its full layout is documented in tools/prepare_data.py, which writes it.

Reading: a split's shards are one token stream, their concatenation. ShardedTokens gives `len()` and slices
`t[a:b]`, each slice read from the files with one read per shard it touches: nothing is mapped or cached, so a
process reading sequences all over a 100 GB corpus holds only the sequences it asked for (an np.memmap would
keep every page it touched resident in the process, counted in its RSS: measured, tests/test_prepare_data.py).
"""
from __future__ import annotations

import bisect
import json
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np

MAGIC = 20240520            # llm.c's GPT-2 token files
VERSION = 1                 # uint16 tokens
HEADER_INTS = 256           # int32 fields; the header is 1024 bytes
HEADER_BYTES = 4 * HEADER_INTS
TOKEN_DTYPE = np.dtype("<u2")   # GPT-2's 50257 ids fit 16 bits; little-endian on disk (shards and data.py's cache)
MAX_SHARD_TOKENS = 2**31 - 1  # ntok is an int32
MANIFEST = "manifest.json"
FORMAT = "nanogpt2-token-shards"  # manifest["format"]: a manifest.json someone else wrote is not ours
FORMAT_VERSION = 1
SPLITS = ("train", "val")
KNOWN_FILES = {20240801: "llm.c's LLaMA-3 token file (uint32 tokens)", 20240522: "llm.c's eval file (HellaSwag/MMLU)"}


def encode_header(n_tokens: int) -> bytes:
    """The 1024-byte header of a shard holding n_tokens tokens."""
    if not 0 <= n_tokens <= MAX_SHARD_TOKENS:
        raise ValueError(f"a shard holds 0 .. {MAX_SHARD_TOKENS:,} tokens (the header's int32 count), got {n_tokens:,}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = MAGIC, VERSION, n_tokens
    return header.tobytes()


def read_header(path: str) -> int:
    """The token count of shard `path`, after checking its magic, version and size; a ValueError names the bad
    value and what a shard must be."""
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"token shard {path} is missing") from None
    if len(raw) < HEADER_BYTES:
        raise ValueError(f"{path} has {len(raw)} bytes, fewer than a shard's {HEADER_BYTES}-byte header: not a "
                         f"complete token shard")
    magic, version, n = (int(v) for v in np.frombuffer(raw, dtype="<i4", count=3))
    if magic != MAGIC:
        what = KNOWN_FILES.get(magic, "not a token shard")
        raise ValueError(f"{path}: magic number {magic}, expected {MAGIC} (llm.c's GPT-2 uint16 token shard): {what}")
    if version != VERSION:
        raise ValueError(f"{path}: version {version}, expected {VERSION} (uint16 tokens); this nanogpt2 reads "
                         f"version {VERSION} only")
    size, expected = os.path.getsize(path), HEADER_BYTES + TOKEN_DTYPE.itemsize * n
    if n < 0 or size != expected:
        raise ValueError(f"{path}: its header says {n:,} tokens, so {expected:,} bytes, but the file has {size:,}: "
                         f"a truncated or damaged shard (run tools/prepare_data.py again into a new folder)")
    return n


class AtomicFile:
    """A file that appears under its name complete or not at all: written as `{path}.tmp{pid}`, then on commit()
    flushed to disk (fsync) and renamed over `path` (os.replace, atomic on POSIX), so a crash, Ctrl-C or full
    disk never leaves a half-written file under the real name; discard() removes the temporary file. As a
    context manager it yields the open file and commits when the block ends without an error, else discards.
    The one way this package replaces a file it writes: shards, manifests, token caches, training_state.pt."""

    def __init__(self, path: str, text: bool = False):
        self.path, self.tmp = path, f"{path}.tmp{os.getpid()}"
        self.file = open(self.tmp, "w", encoding="utf-8") if text else open(self.tmp, "wb")

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())      # on disk before its name says it is complete
        self.file.close()
        os.replace(self.tmp, self.path)

    def discard(self) -> None:
        self.file.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()


class ShardFile:
    """One shard being written: the header (its count filled in last), then tokens appended in as many calls as
    the writer likes; close() makes it complete under its name (AtomicFile), abandon() drops it. The only writer
    of the format: tools/prepare_data.py streams a split through these, write_shard writes one array."""

    def __init__(self, path: str):
        self.path, self.n = path, 0
        self.out = AtomicFile(path)
        self.out.file.write(encode_header(0))

    def append(self, tokens: np.ndarray) -> None:
        """Tokens (N,) of any integer dtype, each a GPT-2 id (checked to fit uint16)."""
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= 2**16):
            raise ValueError(f"token ids must fit uint16 [0, 65536), got {tokens.min()} .. {tokens.max()}")
        encode_header(self.n + len(tokens))     # refuses a count past the header's int32 before writing
        self.out.file.write(tokens.astype(TOKEN_DTYPE, copy=False).tobytes())
        self.n += len(tokens)

    def close(self) -> None:
        self.out.file.seek(0)
        self.out.file.write(encode_header(self.n))
        self.out.commit()

    def abandon(self) -> None:
        self.out.discard()


def write_shard(path: str, tokens: np.ndarray) -> None:
    """Write tokens (N,) as one complete shard at `path` (atomically, see ShardFile)."""
    shard = ShardFile(path)
    try:
        shard.append(tokens)
    except BaseException:
        shard.abandon()
        raise
    shard.close()


# ---- the folder and its manifest ----------------------------------------------------------------

def is_shard_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


def read_manifest(folder: str) -> dict:
    """The manifest of a shard folder, checked to be ours and of a known version (a ValueError otherwise)."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}): not a manifest tools/prepare_data.py wrote") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path}: format {found!r}, expected {FORMAT!r} (a folder written by tools/prepare_data.py)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}")
    return manifest


def write_manifest(folder: str, manifest: dict) -> None:
    """Replace the folder's manifest atomically (AtomicFile)."""
    with AtomicFile(os.path.join(folder, MANIFEST), text=True) as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")


# ---- reading: a split as one stream ---------------------------------------------------------------

class ShardedTokens:
    """The tokens of several shards as one (N,) stream, read from disk on demand.

    Supports len() and contiguous slices only: `t[a:b]` returns a new (b - a,) uint16 array, read with one
    read per shard it spans. Holds no file open and no token in memory between calls.
    `max_token` is the largest id in the stream when the manifest says so (None when unknown)."""

    def __init__(self, paths: list[str], counts: list[int], max_token: Optional[int] = None):
        self.paths = list(paths)
        self.starts = [0]                      # starts[s] = stream index of shard s's first token; starts[-1] = N
        for n in counts:
            self.starts.append(self.starts[-1] + int(n))
        self.max_token = max_token

    @classmethod
    def open(cls, paths: list[str], expected_counts: Optional[list[int]] = None,
             max_token: Optional[int] = None) -> "ShardedTokens":
        """Read every shard's header (magic, version, size); when the manifest gave counts, they must agree."""
        counts = [read_header(p) for p in paths]
        for p, n, want in zip(paths, counts, expected_counts or counts):
            if n != want:
                raise ValueError(f"{p} holds {n:,} tokens but the manifest lists {want:,}: the folder was changed "
                                 f"after tools/prepare_data.py wrote it")
        return cls(paths, counts, max_token)

    def __len__(self) -> int:
        return self.starts[-1]

    def __getitem__(self, key) -> np.ndarray:
        if not isinstance(key, slice):
            raise TypeError(f"ShardedTokens supports slices t[a:b] only, got {type(key).__name__}")
        start, stop, step = key.indices(len(self))
        if step != 1:
            raise ValueError(f"ShardedTokens slices must be contiguous (step 1), got step {step}")
        out = np.empty(max(0, stop - start), dtype=TOKEN_DTYPE)
        s = bisect.bisect_right(self.starts, start) - 1   # the shard holding token `start` (last of equal starts)
        pos = start
        while pos < stop:
            n = min(stop, self.starts[s + 1]) - pos       # tokens to take from shard s (0 for an empty shard)
            if n > 0:
                self._read(s, pos - self.starts[s], out[pos - start: pos - start + n])
            pos += n
            s += 1
        return out

    def _read(self, shard: int, first: int, into: np.ndarray) -> None:
        """Tokens first .. first+len(into)-1 of one shard, read straight into `into` (open, seek, read, close:
        no buffer of ours, no state kept between reads)."""
        path, want = self.paths[shard], into.nbytes
        with open(path, "rb", buffering=0) as f:
            f.seek(HEADER_BYTES + TOKEN_DTYPE.itemsize * first)
            got = f.readinto(memoryview(into).cast("B"))
        if got != want:
            raise ValueError(f"{path}: read {got} of {want} bytes at token {first:,}: the shard was truncated after "
                             f"it was opened")


@dataclass
class ShardFolder:
    """A complete shard folder: each split's token stream and the manifest that lists it."""
    path: str
    manifest: dict
    train: ShardedTokens
    val: ShardedTokens


def open_shard_folder(folder: str) -> ShardFolder:
    """Open a folder written by tools/prepare_data.py: its manifest must say the job finished; every listed
    shard's header and size are checked (no tokens are read)."""
    manifest = read_manifest(folder)
    if not manifest.get("complete"):
        raise ValueError(f"{folder}: tools/prepare_data.py has not finished this folder (manifest.json says "
                         f"complete: false); run the same prepare_data command again to finish it")
    streams = {}
    for split in SPLITS:
        shards = manifest["splits"][split]["shards"]
        streams[split] = ShardedTokens.open([os.path.join(folder, sh["file"]) for sh in shards],
                                            [sh["tokens"] for sh in shards],
                                            max_token=max((sh["max_token"] for sh in shards), default=-1))
    return ShardFolder(folder, manifest, streams["train"], streams["val"])
