"""`python -m nanogpt2 generate`: continue a prompt, printing the text to stdout as the tokens arrive.

Greedy decoding unless told to sample: sampling is on when any of --temperature, --top-k, --top-p, --min-p is
given, or with --do-sample. Knobs left unset keep generate()'s defaults, which are transformers' (each flag's
help shows its own): so `--temperature 0.8` alone still applies top-k filtering; add --top-k 0 to sample
from every token. Generation stops at the model's eos token (not printed), after --max-new-tokens, or at the
first --stop string (not printed either). A token can end in the middle of a UTF-8 character (GPT-2's BPE
works on bytes): such bytes are held back until the character is complete. The prompt is echoed first; an
empty prompt starts from <|endoftext|>, as GPT-2's unconditional samples do. With --num-beams or
--num-return-sequences above 1, each sequence is printed whole at the end. Timing goes to stderr.

    python -m nanogpt2 generate --model gpt2 --prompt "The meaning of life is" --max-new-tokens 40
    python -m nanogpt2 generate --model ./ckpt --prompt "Once" --temperature 0.8 --seed 0 --stop $'\\n\\n'
"""
from __future__ import annotations

import argparse
import codecs
import sys
import time

import torch

from .dtypes import DTYPES, FLAG_CHOICES
from .quantization import DEFAULT_GROUP_SIZE, GROUP_SIZES, MODES
from .generation import GenerationConfig, generate, stream
from .model import GPT2LMHeadModel
from .tokenizer import get_tokenizer

DEFAULTS = GenerationConfig()
SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "min_p")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local checkpoint directory, bundled model name or hub id")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, i.e. start from <|endoftext|>)")
    p.add_argument("--max-new-tokens", type=int, default=100, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--do-sample", action="store_true",
                   help="sample even though no sampling knob is given (they then keep their defaults)")
    p.add_argument("--temperature", type=float, help=f"sample; divide logits by T (default {DEFAULTS.temperature})")
    p.add_argument("--top-k", type=int, help=f"sample from the k most likely tokens; 0: all (default {DEFAULTS.top_k})")
    p.add_argument("--top-p", type=float, help=f"sample from the smallest set with probability >= P "
                                               f"(default {DEFAULTS.top_p})")
    p.add_argument("--min-p", type=float, help="sample from tokens with p >= P * p(most likely) (default: off)")
    p.add_argument("--repetition-penalty", type=float, help=f"> 1 discourages repeats (default "
                                                            f"{DEFAULTS.repetition_penalty})")
    p.add_argument("--num-beams", type=int, help=f"beam search with this many beams (default {DEFAULTS.num_beams}: "
                                                 "none); prints each result at the end instead of streaming")
    p.add_argument("--num-return-sequences", type=int,
                   help=f"sequences to print: best beams, or independent samples (default "
                        f"{DEFAULTS.num_return_sequences})")
    p.add_argument("--seed", type=int, help="seed for sampling: same seed, same text (default: unseeded)")
    p.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="stop before this text (not printed); repeat the flag for several")
    p.add_argument("--dtype", choices=FLAG_CHOICES, default="float32", help="weights' dtype (default: %(default)s)")
    p.add_argument("--quantize", choices=MODES, default=None,
                   help="store the block projections and lm_head as int8 or int4 weights while loading: "
                        "fewer bytes read per token (quantization.py); default: off")
    p.add_argument("--group-size", type=int, default=None,
                   help=f"int4's group size: {', '.join(map(str, GROUP_SIZES))} (default {DEFAULT_GROUP_SIZE})")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step: faster per token, after a compile of up to a minute "
                        "(worth it for long outputs; generate(compile=True))")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available, else cpu)")


class TextStream:
    """Token ids in, printable text out. Holds back (1) the bytes of an unfinished UTF-8 character and (2) any
    trailing text that may be the start of a stop string; once a stop string appears, releases what precedes
    it and nothing more."""

    def __init__(self, encoding, stop=()):
        self.encoding = encoding
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stop = [s for s in stop if s]
        self.pending = ""     # decoded, not yet released
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.pending += self.utf8.decode(self.encoding.decode_bytes([token]))
        return self._release(final=False)

    def finish(self) -> str:
        """The rest, at the end of generation (an unfinished character becomes U+FFFD)."""
        if self.stopped:
            return ""
        self.pending += self.utf8.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        # keep the longest tail that a stop string starts with: the next token may complete it
        hold = 0 if final else max((k for s in self.stop for k in range(1, len(s))
                                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out


def main(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except ValueError as e:   # bad flag values and checkpoints: generate() and the loader name the problem
        print(f"nanogpt2 generate: error: {e}", file=sys.stderr)
        return 2


def run(args: argparse.Namespace, out=None) -> int:
    out = out or sys.stdout
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT2LMHeadModel.from_pretrained(args.model, dtype=DTYPES[args.dtype], device=device,
                                            quantize=args.quantize, group_size=args.group_size)
    enc = get_tokenizer()
    ids = enc.encode(args.prompt, allowed_special="all") if args.prompt else [enc.eot_token]
    kwargs = {name: getattr(args, name) for name in SAMPLING_FLAGS + ("repetition_penalty", "num_beams",
                                                                     "num_return_sequences")
              if getattr(args, name) is not None}
    kwargs.update(max_new_tokens=args.max_new_tokens, compile=args.compile,
                  do_sample=args.do_sample or any(getattr(args, f) is not None for f in SAMPLING_FLAGS))
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    input_ids = torch.tensor([ids], device=device)
    eos = {model.config.eos_token_id} if model.config.eos_token_id is not None else set()

    t0, n = time.perf_counter(), 0
    if kwargs.get("num_beams", 1) == 1 and kwargs.get("num_return_sequences", 1) == 1:
        out.write(args.prompt)
        out.flush()
        text = TextStream(enc, args.stop)
        for token in stream(model, input_ids, generator=generator, **kwargs):
            t, n = int(token[0]), n + 1
            if t in eos:
                break
            out.write(text.push(t))
            out.flush()
            if text.stopped:   # leaving the loop ends generation
                break
        out.write(text.finish() + "\n")
    else:   # several sequences (or beams, decided only at the end): print each when all are done
        rows = generate(model, input_ids, generator=generator, **kwargs)[:, len(ids):]
        n = rows.numel()
        for i, row in enumerate(rows.tolist()):
            text = TextStream(enc, args.stop)
            pieces = []
            for t in row:
                if t in eos or text.stopped:
                    break
                pieces.append(text.push(t))
            out.write(f"--- sequence {i + 1} ---\n{args.prompt}{''.join(pieces)}{text.finish()}\n")
    out.flush()
    dt = time.perf_counter() - t0
    weights = args.dtype if args.quantize is None else f"{args.quantize} weights, {args.dtype} activations"
    print(f"[{n} tokens in {dt:.2f} s: {n / dt:.1f} tok/s on {device}, {weights}]", file=sys.stderr)
    return 0
