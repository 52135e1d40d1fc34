"""process_weights: rewrite a GPT-2's weights into an equivalent form that is easier to read (TransformerLens's
weight processing), in place, opt-in. A model from from_pretrained stays transformers-exact until you call it.

Each transform leaves the function the model computes unchanged (up to float rounding), or changes its logits
by a constant per position (center_unembed), which no probability notices:

  fold_ln                 every LayerNorm's weight and bias move into the linear layer that reads it
                          (ln_1 -> attn.c_attn, ln_2 -> mlp.c_fc, ln_f -> lm_head); the LayerNorms are left as
                          pure normalisation, weight 1 and bias 0 (still nn.LayerNorm). The folded matrices are
                          also centred over their input (the residual dimension): a LayerNorm's output has zero
                          mean, so the mean of a row reads nothing.
  center_writing_weights  every matrix that writes into the residual stream (wte, wpe, attn.c_proj, mlp.c_proj,
                          and those biases) has its mean over the residual dimension removed: each write then has
                          zero mean, which every reader (a LayerNorm) would subtract anyway.
  center_unembed          lm_head's weight (and bias) lose their mean over the vocabulary: every logit of a
                          position moves by the same amount, so log-probabilities are unchanged, logits are not.
  fold_value_biases       the value bias of c_attn moves through c_proj into c_proj's bias: attention
                          probabilities sum to 1 over keys, so every query's z carries the bias b_v exactly once,
                          and W_O b_v is a constant output. (A padding query attends to nothing: its z is zero, so
                          its meaningless output changes; real positions do not.)

GPT-2 ties lm_head to wte (one matrix reads tokens in and writes logits out). Every transform but
fold_value_biases changes one of the two and not the other, so process_weights unties them first: lm_head gets
its own copy of the matrix (V x C more memory: 154 MB for GPT-2 124M in fp32) and config.tie_word_embeddings
becomes False. fold_ln gives lm_head a bias (ln_f.bias @ W_U; GPT-2's lm_head has none), which no GPT-2 checkpoint
format holds: a processed model is for analysis, and save_pretrained refuses it (PROCESSED_REFUSAL, set on the
model by process_weights and read by weights.check_saveable) — save the unprocessed model instead.

What changes in the activations: with fold_ln, ln_1/ln_2/ln_f are normalised only (no affine); with
center_writing_weights, every residual point (embed, resid_mid, resid_post, attn.out, mlp.out) is its centred
self; with fold_value_biases, attn.v and attn.z lose the value bias. Logits, loss and greedy tokens stay.

The arithmetic runs in float64 and is written back into the same Parameters (dtype, device and identity kept).
"""
from __future__ import annotations

import torch
import torch.nn as nn


PROCESSED_REFUSAL = ("its weights were processed for analysis (nanogpt2.analysis.process_weights: folded LayerNorms, "
                     "an untied lm_head with a bias), which a GPT-2 checkpoint cannot represent; save the model "
                     "before processing it")


def process_weights(model, fold_ln: bool = True, center_writing_weights: bool = True, center_unembed: bool = True,
                    fold_value_biases: bool = True):
    """Apply the chosen transforms (module docstring) to `model`, a GPT2LMHeadModel, in place, in
    TransformerLens's order; returns the same model. The defaults are TransformerLens's (from_pretrained),
    which shift logits by a per-position constant (center_unembed): pass center_unembed=False to keep the
    logits themselves. To keep the original, process a copy: process_weights(copy.deepcopy(model))."""
    if not hasattr(model, "lm_head"):
        raise TypeError(f"process_weights needs a GPT2LMHeadModel (it folds ln_f into lm_head), got "
                        f"{type(model).__name__}")
    t = model.transformer
    _check_plain_linears(model)
    if fold_ln or center_writing_weights or center_unembed or fold_value_biases:
        model.checkpoint_refusal = PROCESSED_REFUSAL   # read by weights.check_saveable
    with torch.no_grad():
        if fold_ln or center_writing_weights or center_unembed:
            _untie(model)
        if fold_ln:
            for block in t.h:
                _fold_ln(block.ln_1, block.attn.c_attn)
                _fold_ln(block.ln_2, block.mlp.c_fc)
            if model.lm_head.bias is None:   # ln_f's bias becomes a per-token constant on the logits
                model.lm_head.bias = nn.Parameter(model.lm_head.weight.new_zeros(model.config.vocab_size))
            _fold_ln(t.ln_f, model.lm_head)
        if center_writing_weights:
            for emb in (t.wte, t.wpe):
                _set(emb.weight, _f64(emb.weight) - _f64(emb.weight).mean(-1, keepdim=True))
            for block in t.h:
                for proj in (block.attn.c_proj, block.mlp.c_proj):   # [out = C, in]: centre each column
                    _set(proj.weight, _f64(proj.weight) - _f64(proj.weight).mean(0, keepdim=True))
                    _set(proj.bias, _f64(proj.bias) - _f64(proj.bias).mean())
        if center_unembed:
            W_U = model.lm_head.weight   # (V, C): centre over the vocabulary
            _set(W_U, _f64(W_U) - _f64(W_U).mean(0, keepdim=True))
            if model.lm_head.bias is not None:
                _set(model.lm_head.bias, _f64(model.lm_head.bias) - _f64(model.lm_head.bias).mean())
        if fold_value_biases:
            C = model.config.n_embd
            for block in t.h:
                b_v = _f64(block.attn.c_attn.bias)[2 * C:]   # c_attn's output is [q | k | v], each (H * D)
                proj = block.attn.c_proj
                _set(proj.bias, _f64(proj.bias) + _f64(proj.weight) @ b_v)   # z's layout is (H * D) too
                block.attn.c_attn.bias[2 * C:] = 0
    return model


def _fold_ln(ln: nn.LayerNorm, linear: nn.Linear) -> None:
    """linear(ln(x)) = W (n(x) * w + b) + c = (W * w) n(x) + (W b + c), n(x) the normalised x; then centre
    W's rows over the input (n(x) has zero mean) and leave ln as n alone."""
    W, w, b = _f64(linear.weight), _f64(ln.weight), _f64(ln.bias)   # W: (out, in = C)
    _set(linear.bias, _f64(linear.bias) + W @ b)
    W = W * w
    _set(linear.weight, W - W.mean(-1, keepdim=True))
    ln.weight.fill_(1.0)
    ln.bias.zero_()


def _untie(model) -> None:
    if model.lm_head.weight is model.transformer.wte.weight:
        model.lm_head.weight = nn.Parameter(model.transformer.wte.weight.detach().clone())
    model.config.tie_word_embeddings = False   # so tie_weights() does not tie them back


def _check_plain_linears(model) -> None:
    for name, m in model.named_modules():
        if name.endswith(("c_attn", "c_proj", "c_fc", "lm_head")) and type(m) is not nn.Linear:
            raise TypeError(f"process_weights rewrites nn.Linear weights, but {name} is {type(m).__name__}: merge "
                            f"LoRA adapters / load the unquantized model first")


def _f64(p: torch.Tensor) -> torch.Tensor:
    return p.detach().double()


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    p.copy_(value.to(p.dtype))
