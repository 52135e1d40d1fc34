"""`nanogpt2 verify`: load one checkpoint in nanogpt2 and in transformers, run the same batch, compare.

Prints a fixed-width table of max |difference| at each point transformers exposes (embeddings, each
block's output, ln_f, logits, loss) and returns non-zero when any exceeds the tolerance. The batch has
a left-padded row, so the attention-mask path is checked too; padding positions are not compared (their
values are meaningless in every implementation).
"""
from __future__ import annotations

import os
import platform
import tempfile

import torch

SAMPLE = ("It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
          "foolishness, it was the epoch of belief, it was the epoch of incredulity.")


def _batch(vocab_size: int, n_positions: int):
    from .tokenizer import get_tokenizer
    ids = get_tokenizer().encode(SAMPLE)
    ids = [i % vocab_size for i in ids][: min(48, n_positions)]
    short = ids[: max(1, len(ids) // 2)]
    pad = len(ids) - len(short)
    input_ids = torch.tensor([ids, [0] * pad + short])
    mask = torch.ones_like(input_ids)
    mask[1, :pad] = 0
    return input_ids, mask


def random_hf_checkpoint(directory: str, seed: int = 0) -> str:
    """A randomly initialised 124M GPT-2, built and saved by transformers (what `verify` loads by default)."""
    import transformers
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    model.save_pretrained(directory)
    return directory


def quiet_transformers():
    """transformers' progress bars and advisory logs would interleave with our table."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


def verify(model_name: str | None = None, atol: float = 1e-4, attn_implementation: str = "sdpa") -> int:
    transformers = quiet_transformers()
    from .model import GPT2LMHeadModel, positions_from_mask

    with tempfile.TemporaryDirectory() as tmp:
        if model_name is None:
            print("model: randomly initialised GPT-2 124M (built by transformers, saved as safetensors)")
            model_name = random_hf_checkpoint(os.path.join(tmp, "gpt2-random"))
        ours = GPT2LMHeadModel.from_pretrained(model_name, attn_implementation=attn_implementation)
        from .weights import resolve
        theirs = transformers.GPT2LMHeadModel.from_pretrained(resolve(model_name).directory,
                                                             attn_implementation="eager", dtype=torch.float32).eval()

    cfg = ours.config
    input_ids, mask = _batch(cfg.vocab_size, cfg.n_positions)
    pos = positions_from_mask(mask, 0, input_ids.shape[1], "cpu")
    real = mask.bool()[..., None]  # compare real tokens only
    labels = input_ids.masked_fill(mask == 0, -100)
    labels[:, 1:] = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)  # no loss on logits at padding
    with torch.no_grad():
        a = ours(input_ids, attention_mask=mask, labels=labels, output_hidden_states=True, output_attentions=True)
        b = theirs(input_ids, attention_mask=mask, position_ids=pos, labels=labels, output_hidden_states=True,
                   output_attentions=True)

    print(f"nanogpt2 ({attn_implementation}) vs transformers {transformers.__version__} (eager), fp32, "
          f"{platform.processor() or platform.machine()}, batch {tuple(input_ids.shape)} with left padding")
    print(f"{'point':<24}{'max |diff|':>14}{'tolerance':>12}  ok")
    rows = [("embeddings", a.hidden_states[0], b.hidden_states[0])]
    for i in range(1, cfg.n_layer):
        rows.append((f"block {i - 1}", a.hidden_states[i], b.hidden_states[i]))
    rows.append((f"block {cfg.n_layer - 1} + ln_f", a.hidden_states[-1], b.hidden_states[-1]))
    for i in range(cfg.n_layer):
        rows.append((f"attention probs {i}", a.attentions[i] * mask[:, None, :, None],
                     b.attentions[i] * mask[:, None, :, None]))
    rows.append(("logits", a.logits, b.logits))
    failed = 0
    for name, x, y in rows:
        if x.shape[:2] == real.shape[:2] and x.dim() == 3:
            x, y = x * real, y * real
        diff = (x - y).abs().max().item()
        ok = diff <= atol
        failed += not ok
        print(f"{name:<24}{diff:>14.3e}{atol:>12.0e}  {'ok' if ok else 'MISMATCH'}")
    diff = abs(a.loss.item() - b.loss.item())
    failed += diff > atol
    print(f"{'loss':<24}{diff:>14.3e}{atol:>12.0e}  {'ok' if diff <= atol else 'MISMATCH'}")
    print("verify: " + ("all points match" if not failed else f"{failed} point(s) exceed the tolerance"))
    return 1 if failed else 0
