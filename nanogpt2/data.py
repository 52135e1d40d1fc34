"""Training data: a text file -> a cached uint16 token file -> memory-mapped (x, y) batches; or a folder of
token shards (tools/prepare_data.py, nanogpt2.shards) streamed from disk.

Tokenizing is done once per file and cached: the GPT-2 tokenizer (tiktoken "gpt2", vocab 50257 < 2**16, so
uint16 holds every id) turns the text into one flat token stream on disk, read back with np.memmap, so a
corpus larger than RAM trains without ever being loaded whole (the OS pages in what a batch touches).
The cache file is named by a hash of the text file's absolute path, size and mtime: editing the file
re-tokenizes it, re-running on an unchanged file does not.

Splits: the last `val_fraction` of the tokens (default 10%) is the held-out validation split, the rest
trains. For a single book (tinyshakespeare) that means the end of the book is never trained on.

Batches follow llm.c's DataLoader / nanoGPT's get_batch shape: a sequence is T+1 consecutive tokens,
x = tokens[:T], y = tokens[1:] (the next-token targets), so every position of x has a target.
The training split is cut into non-overlapping sequences, visited in a fresh random order each epoch.
Which sequences a step reads is a pure function of (seed, global sequence index), so a data position is
one integer (sequences consumed so far): that is what a checkpoint stores, and what lets several DDP
ranks read disjoint slices of the same global batch.

A shard folder feeds the same Split and SequenceSampler: its train and val streams (the split prepare_data
made) are ShardedTokens, sliced by positioned reads instead of a memmap, and its epochs are shuffled by a
permutation computed per index (FeistelPermutation, O(1) memory) instead of a stored one (8 bytes per sequence,
which would grow with the corpus). Memory while training on shards does not depend on the corpus size.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .shards import TOKEN_DTYPE, AtomicFile, ShardedTokens, is_shard_folder, open_shard_folder
from .tokenizer import get_tokenizer

CHUNK_CHARS = 1 << 22            # characters read (and tokenized) at a time: ~4 MB of text
# A safe place to cut text for BPE: a single "\n" with non-whitespace on both sides. GPT-2's pre-tokenizer
# regex never joins such a newline to a neighbour (`\s+(?!\S)` and `\s` both end at it, no letter/number/
# punctuation piece contains it), so tokenizing the two halves separately gives exactly the tokens of
# the whole. Cutting elsewhere could split "\n\n" (one token, 628) into two "\n" tokens.
_SAFE_CUT = re.compile(r"(?<=\S\n)(?=\S)")


def default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nanogpt2", "tokens")


def cache_path(text_file: str, cache_dir: Optional[str] = None) -> str:
    """Where the tokens of `text_file` are cached: keyed by its absolute path, size and mtime (ns)."""
    st = os.stat(text_file)
    key = f"{os.path.abspath(text_file)}|{st.st_size}|{st.st_mtime_ns}|gpt2".encode()
    stem = os.path.splitext(os.path.basename(text_file))[0]
    return os.path.join(cache_dir or default_cache_dir(), f"{stem}-{hashlib.sha256(key).hexdigest()[:16]}.uint16")


def _text_chunks(f, chunk_chars: int):
    """Yield pieces of an open text file that tokenize independently (cut only at _SAFE_CUT)."""
    buf = ""
    while True:
        new = f.read(chunk_chars)
        buf += new
        if not new:  # end of file: the rest is one piece
            if buf:
                yield buf
            return
        cut = None
        for m in _SAFE_CUT.finditer(buf, max(0, len(buf) - chunk_chars)):
            cut = m.start()  # keep the last safe cut in the newly read part
        if cut is not None:  # else no safe cut yet (e.g. a file without line breaks): keep reading
            yield buf[:cut]
            buf = buf[cut:]


def tokenize_file(text_file: str, cache_dir: Optional[str] = None, chunk_chars: int = CHUNK_CHARS,
                  verbose: bool = True) -> str:
    """Tokenize `text_file` (UTF-8) into a flat uint16 token file, chunk by chunk; return its path.

    A cached file is reused as is. The file is written under a temporary name and renamed when complete,
    so an interrupted run never leaves a truncated cache behind. `<|endoftext|>` in the text is read as
    plain text (encode_ordinary), never as the special token.
    """
    if is_shard_folder(text_file):
        raise ValueError(f"{text_file!r} is a folder of token shards (tools/prepare_data.py): only tools/train.py "
                         f"--data reads those; here pass a UTF-8 text file")
    if os.path.isdir(text_file):
        raise ValueError(f"training data {text_file!r} is a folder without a manifest.json: pass a UTF-8 text file, "
                         f"or a folder of token shards written by tools/prepare_data.py (which reads folders of text)")
    if not os.path.isfile(text_file):
        raise FileNotFoundError(f"training data {text_file!r} does not exist (pass --data PATH to a UTF-8 text file)")
    out = cache_path(text_file, cache_dir)
    if os.path.isfile(out):
        return out
    os.makedirs(os.path.dirname(out), exist_ok=True)
    enc = get_tokenizer()
    n = 0
    try:
        with open(text_file, encoding="utf-8") as f, AtomicFile(out) as w:
            for piece in _text_chunks(f, chunk_chars):
                ids = np.asarray(enc.encode_ordinary(piece), dtype=TOKEN_DTYPE)
                ids.tofile(w)
                n += len(ids)
    except UnicodeDecodeError as e:
        raise ValueError(f"{text_file} is not UTF-8 text: {e}") from None
    if verbose:
        print(f"tokenized {text_file}: {n:,} tokens -> {out}")
    return out


def load_tokens(token_file: str) -> np.ndarray:
    """The flat token stream (N,) uint16, memory-mapped read-only. An empty file (an empty text) is N = 0, an
    empty array: mmap cannot map 0 bytes, and whoever needs tokens says how many (split_tokens)."""
    n_bytes = os.path.getsize(token_file)
    if n_bytes % np.dtype(TOKEN_DTYPE).itemsize:
        raise ValueError(f"{token_file} has {n_bytes} bytes, not a whole number of {np.dtype(TOKEN_DTYPE).itemsize}-"
                         f"byte tokens: not a complete token file (delete it to re-tokenize)")
    if n_bytes == 0:
        return np.empty(0, dtype=TOKEN_DTYPE)
    return np.memmap(token_file, dtype=TOKEN_DTYPE, mode="r")


@dataclass
class Split:
    """One split of the token stream, cut into sequences of T+1 tokens starting every T tokens."""
    tokens: Union[np.ndarray, ShardedTokens]  # (N,) uint16: a view of the memmap, or shards read on demand
    block_size: int      # T

    @property
    def num_sequences(self) -> int:
        return max(0, (len(self.tokens) - 1) // self.block_size)

    @property
    def streamed(self) -> bool:
        """Read from shards on demand (a corpus of any size), not a memmap of one token file."""
        return isinstance(self.tokens, ShardedTokens)

    def sequence(self, i: int) -> np.ndarray:
        """Sequence i: tokens[i*T : i*T + T + 1], (T+1,)."""
        T = self.block_size
        return self.tokens[i * T: i * T + T + 1]


def split_tokens(tokens: np.ndarray, val_fraction: float, block_size: int,
                 source: str = "the data") -> tuple[Split, Split]:
    """(train, val): val is the last `val_fraction` of the tokens, train everything before it. Each split
    needs block_size + 1 tokens for one sequence (val only when val_fraction > 0); too few is a ValueError
    naming `source` (the text file), the counts and what to change."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction!r}")
    N, need = len(tokens), block_size + 1
    if N < need:
        raise ValueError(f"{source} has {N} tokens, fewer than block_size + 1 = {need} for one training sequence: "
                         f"use more text" + (f" or a --block-size below {N}" if N >= 2 else ""))
    n_val = int(round(N * val_fraction))
    train, val = Split(tokens[: N - n_val], block_size), Split(tokens[N - n_val:], block_size)
    if train.num_sequences == 0:
        raise ValueError(f"{source}: --val-fraction {val_fraction} holds out {n_val} of its {N} tokens, leaving "
                         f"{N - n_val} to train on, fewer than block_size + 1 = {need}: use a --val-fraction of at "
                         f"most {math.floor((N - need) / N * 1e4) / 1e4:g}, a smaller --block-size, or more text")
    if val_fraction > 0 and val.num_sequences == 0:
        fix = f"a --val-fraction of at least {math.ceil(need / N * 1e4) / 1e4:g}, " if 2 * need <= N else ""
        raise ValueError(f"{source}: --val-fraction {val_fraction} holds out {n_val} of its {N} tokens for "
                         f"validation, fewer than block_size + 1 = {need}: use {fix}--val-fraction 0 (no "
                         f"validation), a smaller --block-size, or more text")
    return train, val


def shard_splits(folder: str, block_size: int) -> tuple[Split, Split]:
    """(train, val) of a shard folder written by tools/prepare_data.py: the split it made (its --val-fraction),
    each streamed from its shards. Too few tokens for one sequence of block_size + 1 is a ValueError naming
    the folder, the counts and what to change, as split_tokens does for a text file; a folder prepared with
    --val-fraction 0 gives an empty val split (no validation)."""
    shards = open_shard_folder(folder)
    train, val = Split(shards.train, block_size), Split(shards.val, block_size)
    need = block_size + 1
    if train.num_sequences == 0:
        raise ValueError(f"{folder} has {len(train.tokens)} training tokens, fewer than block_size + 1 = {need} "
                         f"for one training sequence: prepare more text"
                         + (f" or use a --block-size below {len(train.tokens)}" if len(train.tokens) >= 2 else ""))
    if len(val.tokens) and val.num_sequences == 0:
        raise ValueError(f"{folder}: its validation split has {len(val.tokens)} tokens, fewer than block_size + 1 = "
                         f"{need}: prepare the data again (into a new folder) with a larger --val-fraction, or with "
                         f"--val-fraction 0 for no validation, or use a smaller --block-size")
    return train, val


def max_token_id(tokens: Union[np.ndarray, ShardedTokens]) -> int:
    """The largest token id (-1 when empty): a shard folder's from its manifest, else by a chunked scan."""
    if isinstance(tokens, ShardedTokens) and tokens.max_token is not None:
        return tokens.max_token
    return max((int(tokens[s: s + (1 << 24)].max()) for s in range(0, len(tokens), 1 << 24)), default=-1)


def check_vocab(source: str, vocab_size: int, *streams: Union[np.ndarray, ShardedTokens]) -> None:
    """Every token id in the streams must be < vocab_size: GPT-2's ids reach 50256, so a smaller vocabulary
    fits only data whose ids all fit (a ValueError names the largest)."""
    if vocab_size >= 50257:
        return
    top = max((max_token_id(t) for t in streams), default=-1)
    if top >= vocab_size:
        raise ValueError(f"{source} has token id {top}, out of range for vocab_size {vocab_size}; "
                         f"use the GPT-2 vocabulary (50257) for this data")


_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's output function (Steele, Lea & Flood, "Fast splittable pseudorandom number generators",
    OOPSLA 2014): a 64-bit hash in which every output bit depends on every input bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


class FeistelPermutation:
    """A pseudo-random permutation of range(n), keyed by (seed, epoch), computed one index at a time in O(1)
    memory: perm[i] for i in range(n) visits each of 0 .. n-1 exactly once.

    A 4-round Feistel network on 2h-bit integers (2**2h >= n) is a bijection whatever its round function
    (here _mix64 of the right half and a round key); with a random-looking round function it is a
    pseudo-random permutation (Luby & Rackoff, SIAM J. Comput. 1988). To stay inside range(n), re-encrypt
    until the value lands below n ("cycle walking", Black & Rogaway, "Ciphers with arbitrary finite domains",
    CT-RSA 2002): still a bijection of range(n), and since 2**2h <= 4n, at most 4 trips through the network
    on average (~5 us per index in CPython: nothing next to a training step).
    """
    ROUNDS = 4

    def __init__(self, n: int, seed: int, epoch: int):
        bits = max(2, (n - 1).bit_length())
        self.n, self.half = n, (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        base = _mix64(seed & _M64)
        self.keys = [_mix64(base ^ _mix64(epoch * self.ROUNDS + r + 1)) for r in range(self.ROUNDS)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"index {i} out of range for a permutation of {self.n}")
        x = i
        while True:
            left, right = x >> self.half, x & self.mask
            for key in self.keys:
                left, right = right, left ^ (_mix64(right ^ key) & self.mask)
            x = (left << self.half) | right
            if x < self.n:
                return x


class SequenceSampler:
    """Global sequence index k = 0, 1, 2, ... -> a sequence of the split, epoch by epoch in random order.

    Epoch e = k // num_sequences visits every sequence once in the order of a permutation seeded with
    (seed, e): deterministic, independent of how many processes read it, and cheap to resume at any k.
    A memory-mapped token file's permutation is drawn from numpy's PCG64 and kept for the epoch
    (O(num_sequences) int64, the order runs have always had); a streamed shard folder's is a
    FeistelPermutation, computed per index in O(1) memory, so a corpus of any size costs no more memory.
    """

    def __init__(self, split: Split, seed: int, shuffle: bool = True):
        if split.num_sequences == 0:  # else index() would divide by zero
            raise ValueError(f"a split of {len(split.tokens)} tokens has no sequence of block_size + 1 = "
                             f"{split.block_size + 1} tokens to sample")
        self.split, self.seed, self.shuffle = split, seed, shuffle
        self._epoch, self._perm = -1, None

    def index(self, k: int) -> int:
        n = self.split.num_sequences
        epoch, i = divmod(k, n)
        if not self.shuffle:
            return i
        if epoch != self._epoch:
            self._perm = (FeistelPermutation(n, self.seed, epoch) if self.split.streamed
                          else np.random.Generator(np.random.PCG64([self.seed, epoch])).permutation(n))
            self._epoch = epoch
        return int(self._perm[i])

    def batch(self, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences start .. start+count-1 as (x, y), each (count, T) int64."""
        seqs = np.stack([self.split.sequence(self.index(k)) for k in range(start, start + count)]).astype(np.int64)
        seqs = torch.from_numpy(seqs)
        return seqs[:, :-1], seqs[:, 1:]


def unigram_cross_entropy(train: np.ndarray, val: np.ndarray, vocab_size: int = 50257, alpha: float = 1.0) -> float:
    """Cross-entropy (nats/token) on `val` of a unigram model fit on `train`, add-alpha smoothed over the
    vocabulary (so tokens unseen in training get a finite cost): the baseline a language model that
    ignores context would reach. Counting is chunked, so it works on memmaps of any size."""
    counts = np.zeros(vocab_size, dtype=np.float64)
    for s in range(0, len(train), 1 << 24):
        counts += np.bincount(np.asarray(train[s: s + (1 << 24)]), minlength=vocab_size)[:vocab_size]
    logp = np.log(counts + alpha) - np.log(counts.sum() + alpha * vocab_size)
    nll, n = 0.0, 0
    for s in range(0, len(val), 1 << 24):
        chunk = np.asarray(val[s: s + (1 << 24)]).astype(np.int64)
        nll -= logp[chunk].sum()
        n += len(chunk)
    return nll / max(n, 1)
