"""Feature extraction and analysis on the named activation points (hooks.py): the logit lens and attention maps,
and (re-exported from their modules) the activation cache's decompositions and weight processing.

The logic behind tools/logit_lens.py and tools/attention_map.py, importable for notebooks and experiments:

    lens = logit_lens(model, input_ids)             # (n_layer + 1, B, T, V): what each layer "would predict"
    probs, ids = logit_lens_top_k(model, input_ids, k=5)
    maps = attention_maps(model, input_ids, layer=3)  # (B, H, T, T) probabilities, from any backend
    plot_attention(maps[0], [token_label(i) for i in input_ids[0]], "attn.png", head=None)  # grid of heads
    logits, cache = model.run_with_cache(input_ids)   # an ActivationCache (activations.py): DLA, decompositions
    process_weights(model)                            # fold LayerNorms, centre weights (weight_processing.py)

The logit lens (nostalgebraist, "interpreting GPT: the logit lens", 2020) decodes the residual stream after
the embedding and after every block with the model's own final LayerNorm and unembedding (ln_f + lm_head),
as if the remaining blocks were skipped; its last layer is exactly the model's output.
Plots need matplotlib, from the `viz` extra (`pip install 'nanogpt2[viz]'`); nothing else here does.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from .activations import ActivationCache  # noqa: F401  (re-exported: what run_with_cache returns)
from .attention_view import attention_html  # noqa: F401  (re-exported: the interactive HTML view)
from .inputs import check_index  # also the tools' check of --layer and --head
from .tokenizer import encode, token_label  # noqa: F401  (re-exported: text -> checked ids, a token as a label)
from .weight_processing import process_weights  # noqa: F401  (re-exported)

VIZ_HINT = "pip install 'nanogpt2[viz]' (or: pip install matplotlib)"
DEFAULT_TEXT = "First Citizen:\nBefore we proceed any further, hear me speak."   # the tools' --text default


def add_model_and_text(parser) -> None:
    """The --model and --text flags every analysis tool in tools/ takes, with their defaults written once."""
    parser.add_argument("--model", default="shakespeare-tiny", help="bundled model name, local directory or hub id")
    parser.add_argument("--text", default=DEFAULT_TEXT, help="the text to run (GPT-2 tokenizer)")


# ---- positions ----------------------------------------------------------------------------------

def resolve_positions(positions: Optional[Sequence[int]], T: int, what: str = "position") -> list[int]:
    """Token positions as indices in [0, T), negative ones counted from the end as in Python (-1 = last);
    None means all. A position out of range is a ValueError naming it and the valid range."""
    if positions is None:
        return list(range(T))
    for p in positions:
        if not -T <= p < T:
            raise ValueError(f"{what} {p} out of range [-{T}, {T}) (the text is {T} tokens: 0..{T - 1} from the "
                             f"start, -1..-{T} from the end)")
    return [p % T for p in positions]


# ---- the logit lens -----------------------------------------------------------------------------

def lens_points(n_layer: int) -> list[str]:
    """The residual-stream points the lens decodes, one per lens layer: the embedding, then each block's output."""
    return ["embed"] + [f"h.{i}.resid_post" for i in range(n_layer)]


def _residuals(model, input_ids, forward_kwargs) -> list[torch.Tensor]:
    if not hasattr(model, "lm_head"):
        raise TypeError(f"the logit lens needs a GPT2LMHeadModel (it decodes with lm_head), got "
                        f"{type(model).__name__}")
    names = lens_points(model.config.n_layer)
    _, cache = model.run_with_cache(input_ids, names=names, **forward_kwargs)
    return [cache[n] for n in names]  # n_layer + 1 of (B, T, C)


@torch.no_grad()
def logit_lens(model, input_ids, **forward_kwargs) -> torch.Tensor:
    """(n_layer + 1, B, T, V) logits: ln_f + lm_head applied to the embedding (index 0) and to the output of
    block i (index i + 1). The last entry equals the model's logits. Needs (n_layer + 1) * B * T * V floats:
    for long inputs and big vocabularies use logit_lens_top_k."""
    return torch.stack([model.lm_head(model.transformer.ln_f(x)) for x in _residuals(model, input_ids, forward_kwargs)])


@torch.no_grad()
def logit_lens_top_k(model, input_ids, k: int = 5, **forward_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, token ids), each (n_layer + 1, B, T, k), best first: the lens's top k at every layer
    and position, decoded one layer at a time so only one (B, T, V) is ever held."""
    V = model.config.vocab_size
    if not 1 <= k <= V:
        raise ValueError(f"top-k {k} out of range [1, {V}] (the model's vocabulary size)")
    probs, ids = [], []
    for x in _residuals(model, input_ids, forward_kwargs):
        p = torch.softmax(model.lm_head(model.transformer.ln_f(x)).float(), dim=-1)  # (B, T, V)
        top = p.topk(k, dim=-1)
        probs.append(top.values)
        ids.append(top.indices)
    return torch.stack(probs), torch.stack(ids)


def _percent(p: float) -> str:
    """12%, 3.4%, 0.052%: two significant digits however small (an untrained model spreads its bets thin)."""
    x = 100 * p
    return f"{x:.0f}%" if x >= 9.95 else f"{x:.2g}%"


def format_logit_lens(probs: torch.Tensor, ids: torch.Tensor, input_ids: Sequence[int],
                      positions: Optional[Sequence[int]] = None, tokenizer=None, max_token_chars: int = 16) -> str:
    """A fixed-width table of one sequence's lens: for each position, one row per layer with its top-k
    tokens and probabilities. probs, ids: (n_layer + 1, T, k), as logit_lens_top_k returns for one row.
    A * marks the token that actually comes next in the text."""
    n_lens, T, k = ids.shape
    input_ids = [int(i) for i in input_ids]
    positions = resolve_positions(positions, T)
    labels = ["embed"] + [f"h.{i}" for i in range(n_lens - 1)]

    def short(label: str) -> str:
        return label if len(label) <= max_token_chars else label[: max_token_chars - 2] + "…" + label[-1]

    cells = {}  # (layer, position, rank) -> ("' the'*", "12%")
    for pos in positions:
        nxt = input_ids[pos + 1] if pos + 1 < T else None
        for layer in range(n_lens):
            for r in range(k):
                tid = int(ids[layer, pos, r])
                mark = "*" if tid == nxt else " "
                prob = _percent(float(probs[layer, pos, r]))
                cells[layer, pos, r] = (short(token_label(tid, tokenizer)) + mark, prob)
    tok_w = max(len(t) for t, _ in cells.values())
    prob_w = max(len(p) for _, p in cells.values())
    col_w = tok_w + 1 + prob_w + 2
    lines = []
    for pos in positions:
        nxt = input_ids[pos + 1] if pos + 1 < T else None
        lines.append(f"position {pos}: {token_label(input_ids[pos], tokenizer)}"
                     + (f" -> next {token_label(nxt, tokenizer)}" if nxt is not None else " (last)"))
        lines.append(f"{'layer':<8}" + "".join(f"{'top ' + str(r + 1):<{col_w}}" for r in range(k)).rstrip())
        for layer in range(n_lens):
            row = "".join(f"{cells[layer, pos, r][0]:<{tok_w}} {cells[layer, pos, r][1]:>{prob_w}}  " for r in range(k))
            lines.append(f"{labels[layer]:<8}" + row.rstrip())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---- attention maps -----------------------------------------------------------------------------

@torch.no_grad()
def attention_maps(model, input_ids, layer: int, **forward_kwargs) -> torch.Tensor:
    """(B, H, T, S) attention probabilities of one layer (S = T without a KV cache), whichever backend the
    model is set to: asking for the pattern point runs that layer's attention eagerly (hooks.py)."""
    cfg = model.config
    check_index("layer", layer, cfg.n_layer, f"this model has {cfg.n_layer} layers")
    name = f"h.{layer}.attn.pattern"
    _, cache = model.run_with_cache(input_ids, names=[name], **forward_kwargs)
    return cache[name]


def require_matplotlib():
    """matplotlib, or an ImportError that says how to install it."""
    try:
        import matplotlib
        from matplotlib.figure import Figure  # noqa: F401  (the object API: no pyplot, no display needed)
    except ImportError as e:
        raise ImportError(f"attention maps are drawn with matplotlib, which is not installed ({e}): "
                          f"{VIZ_HINT}") from None
    return matplotlib


def plot_attention(probs: torch.Tensor, tokens: Sequence[str], out_path: str, head: Optional[int] = None,
                   title: str = "") -> str:
    """Draw attention probabilities as heatmaps and save them (format from the file name, e.g. .png).

    probs: (H, T, T) for one sequence and layer (a query's row sums to 1 over the keys it sees).
    head: one head's map, or None for every head in a grid. tokens: T axis labels (token_label).
    The causal upper triangle (keys after the query) is left blank rather than drawn as zero.
    """
    matplotlib = require_matplotlib()
    import numpy as np
    from matplotlib.figure import Figure

    H, T, S = probs.shape
    if S != T or len(tokens) != T:
        raise ValueError(f"plot_attention needs square (H, T, T) maps and T labels, got {tuple(probs.shape)} "
                         f"and {len(tokens)} labels")
    heads = list(range(H)) if head is None else [check_index("head", head, H, f"{H} heads per layer")]
    data = probs.detach().float().cpu().numpy()
    future = np.triu(np.ones((T, T), dtype=bool), k=1)  # (query, key) pairs the causal mask hides

    cols = 1 if len(heads) == 1 else math.ceil(math.sqrt(len(heads)))
    rows = math.ceil(len(heads) / cols)
    # inches per panel: ~0.15-0.2 per token keeps 8-point labels apart; bounded so long texts stay drawable
    panel = min(max(3.0 + 0.2 * T, 4.0), 16.0) if len(heads) == 1 else min(max(2.0 + 0.15 * T, 3.0), 8.0)
    fontsize = 8 if T <= 40 else max(4, 8 - (T - 40) // 20)
    step = max(1, math.ceil(T / 100))  # beyond ~100 labels, label every step-th token
    fig = Figure(figsize=(cols * panel + 1.2, rows * panel + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="white")  # masked (future) cells stay blank
    image = None
    for n, ax in enumerate(axes.flat):
        if n >= len(heads):
            ax.set_visible(False)
            continue
        h = heads[n]
        image = ax.imshow(np.ma.masked_array(data[h], mask=future), cmap=cmap, vmin=0.0, vmax=1.0,
                          interpolation="nearest")
        ticks = list(range(0, T, step))
        labels = [tokens[i] for i in ticks]
        bottom = n + cols >= len(heads)  # no panel below this one: its x axis carries the labels
        ax.set_xticks(ticks, labels if bottom else [""] * len(ticks),
                      rotation=90, fontsize=fontsize, family="monospace")
        ax.set_yticks(ticks, labels if n % cols == 0 else [""] * len(ticks), fontsize=fontsize, family="monospace")
        if len(heads) > 1:
            ax.set_title(f"head {h}", fontsize=10)
        if n % cols == 0:
            ax.set_ylabel("query (attending token)")
        if bottom:
            ax.set_xlabel("key (attended token)")
    fig.colorbar(image, ax=axes, shrink=0.6 if len(heads) > 1 else 0.8, label="attention probability")
    if title:
        fig.suptitle(title)
    fig.savefig(out_path, dpi=100 if T <= 40 else 150)  # small labels on long texts need the pixels
    return out_path
