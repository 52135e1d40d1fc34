"""Perplexity of a GPT-2 checkpoint on a text file, with a sliding window (Hugging Face's recipe).

    python tools/eval_perplexity.py --model shakespeare-tiny --data text.txt
    python tools/eval_perplexity.py --model gpt2 --data wiki.test.raw --stride 512        # hub id, cached
    python tools/eval_perplexity.py --model out/ --data input.txt --val-fraction 0.1      # a run's held-out split

Windows of --max-length tokens (default: the model's n_positions) start every --stride tokens; each scores
only the tokens no earlier window scored, with up to max_length - stride tokens of context. stride =
max_length gives disjoint windows (cheapest, least context); smaller strides approach the model's true
perplexity at more cost. Numbers equal what transformers gives with the recipe at
https://huggingface.co/docs/transformers/perplexity (tests/test_eval_perplexity.py checks this).
"""
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from nanogpt2 import GPT2LMHeadModel
from nanogpt2.data import load_tokens, tokenize_file
from nanogpt2.flags import dataclass_parser, flag
from nanogpt2.perplexity import sliding_window_perplexity
from nanogpt2.quantization import DEFAULT_GROUP_SIZE, GROUP_SIZES, quantization_config


@dataclass
class EvalConfig:
    model: str = flag("checkpoint: local HF directory, bundled model name or hub id", default="shakespeare-tiny")
    data: str = flag("UTF-8 text file to score (tokenized with the GPT-2 tokenizer, cached)", default="")
    stride: int = flag("tokens between window starts (each window scores at most this many new tokens)",
                      default=512)
    max_length: Optional[int] = flag("window length in tokens (default: the model's n_positions)", default=None)
    val_fraction: float = flag("score only this last fraction of the tokens (0: the whole file; 0.1: the held-out "
                              "split tools/train.py uses)", default=0.0)
    max_tokens: Optional[int] = flag("score at most this many tokens (from the start of the chosen part)",
                                    default=None)
    device: str = flag("auto, cpu, cuda", default="auto")
    dtype: str = flag("weights dtype: float32, bfloat16, float16, auto (the checkpoint's)", default="float32")
    cache_dir: Optional[str] = flag("token cache directory (see tools/train.py)", default=None)
    quantize: Optional[str] = flag("int8 or int4: quantize the weights while loading (nanogpt2.quantization)",
                                   default=None)
    group_size: Optional[int] = flag(f"int4's group size: {', '.join(map(str, GROUP_SIZES))} (default "
                                     f"{DEFAULT_GROUP_SIZE})", default=None)


def main(argv=None) -> float:
    cfg = EvalConfig(**vars(dataclass_parser(EvalConfig, "tools/eval_perplexity.py", __doc__.split("\n")[0])
                            .parse_args(argv)))
    device = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    model = GPT2LMHeadModel.from_pretrained(cfg.model, dtype=cfg.dtype, device=device, quantize=cfg.quantize,
                                            group_size=cfg.group_size)
    tokens = load_tokens(tokenize_file(cfg.data, cfg.cache_dir, verbose=False))
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise SystemExit(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    start = len(tokens) - int(round(len(tokens) * cfg.val_fraction)) if cfg.val_fraction else 0
    end = len(tokens) if cfg.max_tokens is None else min(len(tokens), start + cfg.max_tokens)
    if end - start < 2:  # the first token has no prediction to score
        raise SystemExit(f"{cfg.data}: tokens {start:,}..{end:,} of its {len(tokens):,} are {end - start} tokens; "
                         f"scoring needs at least 2 (more text, a larger --val-fraction or --max-tokens)")
    ids = torch.from_numpy(tokens[start:end].astype("int64"))
    t0 = time.perf_counter()
    ppl, nll, n = sliding_window_perplexity(model, ids, cfg.max_length, cfg.stride, progress=True)
    dt = time.perf_counter() - t0
    qc = quantization_config(model)   # a quantized checkpoint is scored quantized without --quantize too
    weights = "" if qc is None else f" ({qc['mode']}" + (f", group {qc['group_size']})" if qc["group_size"] else ")")
    print(f"{cfg.model}{weights} on {cfg.data} (tokens {start:,}..{end:,}): perplexity {ppl:.4f} | nll {nll:.4f} nats/token | "
          f"{n:,} tokens scored | max_length {cfg.max_length or model.config.n_positions}, stride {cfg.stride} | "
          f"{dt:.1f} s")
    return ppl


if __name__ == "__main__":
    main()
    sys.exit(0)
