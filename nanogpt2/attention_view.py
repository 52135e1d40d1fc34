"""An interactive attention view: one layer's heads over a text, as one self-contained HTML file.

    html = attention_html(model, "To be, or not to be", layer=1)   # text, or token ids (T,) / (B, T)
    open("view.html", "w", encoding="utf-8").write(html)           # opens in any browser, offline

The page (tools/attention_view.py writes one from the command line):
- a grid of small heatmaps, one per head (rows: queries, the attending tokens; columns: keys), in viridis
  like plot_attention, with the causal upper triangle left blank; click a head to enlarge it;
- hovering a cell of any map names its head, query token, key token and weight in the readout (id="readout");
- the token view (id="tokens") colours every key token by the attention the hovered query pays it, with the
  query outlined; hovering a token there makes it the query (the readout then names its strongest key).

Everything is inline: the data as JSON, the CSS, and a script that paints <canvas> elements. No CDN, no
network, no file beside it. Tokens are strings from outside, so they are kept text all the way: they reach the
page as JSON inside <script type="application/json"> with <, > and & written as \\u003c, \\u003e, \\u0026 (a
token "</script>" cannot end the element), and the script puts them in the page with textContent, never as
markup. In the readout a token is quoted as every tool labels tokens (tokenizer.quote_token: ' the', '\\n'), so a
leading space or a newline shows.

Size: the causal triangle of each head, 4 decimals a weight, about 3.4 * H * T^2 bytes: 12 heads of 256 tokens
make a 2.7 MB page, of 1024 (GPT-2 small's whole context) 43 MB. Made for the tens to hundreds of tokens one reads.
Text, token texts and labels come from tokenizer.py and the index checks from inputs.py, as in the other tools;
analysis.py re-exports attention_html.
"""
from __future__ import annotations

import html
import json
import re
from typing import Optional, Sequence, Union

import torch

from .inputs import check_index, check_mask_shape, check_token_ids
from .tokenizer import encode, quote_token, token_texts  # noqa: F401  (token_texts: importable from here too)

DECIMALS = 4  # weights stored in the page; the readout shows 3


@torch.no_grad()
def attention_html(model, inputs: Union[str, torch.Tensor, Sequence[int]], layer: int, *,
                   attention_mask: Optional[torch.Tensor] = None, row: int = 0,
                   title: Optional[str] = None) -> str:
    """The interactive view of `layer`'s attention heads over `inputs`, as the text of an HTML page.

    inputs: text (GPT-2 tokenizer: tokenizer.encode), or token ids (T,) or (B, T).
    layer: block index in [0, n_layer).
    attention_mask: (B, T) 0/1 for a padded batch (left padding, as generate() takes it; right works too).
    row: which sequence of a batch to show. Its padding positions (mask 0) are dropped, so the page shows only
        that row's real tokens, with exactly the weights the row gets alone (positions come from the mask).
    title: the page's heading; default 'layer L, H heads, T tokens'.
    """
    cfg = model.config
    check_index("layer", layer, cfg.n_layer, f"this model has {cfg.n_layer} layers")
    if isinstance(inputs, str):
        inputs = encode(model, inputs)  # (1, T)
    if not isinstance(inputs, torch.Tensor):
        inputs = torch.tensor(inputs)
    ids = check_token_ids(inputs, cfg.vocab_size).to(model.device)  # (B, T); forward checks the length
    B, T = ids.shape
    check_index("row", row, B, f"the batch has {B} sequences")
    if attention_mask is not None:
        attention_mask = check_mask_shape(attention_mask, (B, T), "batch, tokens").to(model.device)

    name = f"h.{layer}.attn.pattern"
    _, cache = model.run_with_cache(ids, names=[name], attention_mask=attention_mask)
    probs = cache[name][row]  # (H, T, T)
    keep = torch.ones(T, dtype=torch.bool, device=probs.device)
    if attention_mask is not None:
        keep = attention_mask[row].to(probs.device).bool()
        if not keep.any():
            raise ValueError(f"row {row} is all padding (its attention_mask is all 0): nothing to show")
    probs = probs[:, keep][:, :, keep]
    texts = token_texts(ids[row][keep.to(ids.device)].tolist())
    H, n = probs.shape[0], len(texts)
    return attention_page(probs, texts, title or f"layer {layer}, {H} heads, {n} tokens")


def attention_page(probs: torch.Tensor, tokens: Sequence[str], title: str = "") -> str:
    """The page itself, from one sequence's maps: probs (H, T, T) causal attention probabilities (row q sums to
    1 over keys 0..q; keys after the query must be 0) and the T tokens' texts (token_texts)."""
    if probs.dim() != 3 or probs.shape[1] != probs.shape[2] or probs.shape[1] != len(tokens):
        raise ValueError(f"attention_page needs square (H, T, T) maps and T tokens, got {tuple(probs.shape)} "
                         f"and {len(tokens)} tokens")
    probs = probs.detach().double().cpu()
    if probs.triu(diagonal=1).abs().max() > 0:
        raise ValueError("attention_page draws causal maps: a weight on a key after its query is not 0")
    scale = 10 ** DECIMALS
    rounded = ((probs * scale).round() / scale).tolist()
    data = {
        "tokens": list(tokens),
        "labels": [quote_token(t) for t in tokens],  # ' the' -> "' the'", '\n' -> "'\\n'"
        "heads": [[r[: q + 1] for q, r in enumerate(head)] for head in rounded],  # head -> query -> keys 0..q
    }
    fields = {"title": html.escape(title), "data": _script_json(data)}
    return re.sub(r"\{(title|data)\}", lambda m: fields[m.group(1)], PAGE)  # one pass: a field's text is never read again


def _script_json(data) -> str:
    """JSON that is safe inside <script>: <, > and & only occur in strings there, where \\uXXXX means the same."""
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")


# The page. {title} is filled HTML-escaped, {data} with _script_json; the script below is the page's only logic.
PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
  body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
  h1 { font-size: 18px; margin: 0 0 4px; }
  .hint { color: #666; margin: 0 0 12px; }
  main { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
  #grid { display: grid; grid-template-columns: repeat(var(--cols), auto); gap: 8px; }
  figure { margin: 0; cursor: pointer; text-align: center; font-size: 12px; color: #444; }
  figure.selected canvas { outline: 3px solid #e4572e; }
  canvas { display: block; image-rendering: pixelated; border: 1px solid #bbb; }
  canvas.thumb { width: 120px; height: 120px; }
  #detail { display: grid; grid-template-columns: auto auto; grid-template-rows: auto auto; }
  #big { width: min(480px, 80vw); height: min(480px, 80vw); cursor: crosshair; }
  #qlabels, #klabels { display: flex; font: 11px ui-monospace, monospace; color: #333; white-space: pre; }
  #qlabels { flex-direction: column; align-items: flex-end; padding-right: 4px; }
  #klabels { grid-column: 2; padding-top: 4px; }
  #klabels span { writing-mode: vertical-rl; }
  #qlabels span, #klabels span { flex: 1 1 0; min-height: 0; min-width: 0; overflow: hidden; line-height: 1; display: flex; align-items: center; }
  #legend { display: flex; align-items: center; gap: 6px; font-size: 12px; margin: 8px 0; }
  #legend .bar { display: inline-block; width: 160px; height: 10px; border: 1px solid #bbb; }
  #readout { font: 13px ui-monospace, monospace; min-height: 1.4em; margin: 8px 0; padding: 4px 6px; background: #f4f4f4; white-space: pre-wrap; }
  #tokens { font: 15px ui-monospace, monospace; line-height: 1.9; white-space: pre-wrap; max-width: 70ch; }
  #tokens span { border-radius: 2px; cursor: default; }
  #tokens span.query { outline: 2px solid #e4572e; }
  #tokens .nl { color: #999; }
</style>
</head>
<body>
<h1>{title}</h1>
<p class="hint">Rows are queries (the attending token), columns keys. Click a head to enlarge it; hover a cell or a
token to see where that query looks.</p>
<main>
  <section><div id="grid"></div></section>
  <section>
    <div id="big-title"></div>
    <div id="detail"><div id="qlabels"></div><canvas id="big"></canvas><div id="klabels"></div></div>
    <div id="legend">0 <span class="bar"></span> 1 &nbsp;attention probability (blank: key after the query)</div>
    <div id="readout">hover a cell</div>
    <div id="tokens"></div>
  </section>
</main>
<script type="application/json" id="attention-data">{data}</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("attention-data").textContent);
const H = D.heads.length, T = D.tokens.length;
const $ = (id) => document.getElementById(id);
let selected = 0;

// viridis (matplotlib's default map, as plot_attention draws), 10 stops, linear in between
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
                 [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
function colour(p) {
  const x = Math.min(Math.max(p, 0), 1) * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  return VIRIDIS[i].map((c, j) => Math.round(c + (x - i) * (VIRIDIS[i + 1][j] - c)));
}

// one pixel per (query, key) cell; CSS scales the canvas up without smoothing
function paint(canvas, h) {
  canvas.width = T; canvas.height = T;
  const ctx = canvas.getContext("2d"), img = ctx.createImageData(T, T);
  for (let q = 0; q < T; q++) for (let k = 0; k < T; k++) {
    const rgb = k <= q ? colour(D.heads[h][q][k]) : [255, 255, 255], o = 4 * (q * T + k);
    img.data[o] = rgb[0]; img.data[o + 1] = rgb[1]; img.data[o + 2] = rgb[2]; img.data[o + 3] = 255;
  }
  ctx.putImageData(img, 0, 0);
}

// the (query, key) cell under the mouse
function cell(canvas, e) {
  const r = canvas.getBoundingClientRect(), clamp = (v) => Math.min(Math.max(v, 0), T - 1);
  return [clamp(Math.floor((e.clientY - r.top) / r.height * T)), clamp(Math.floor((e.clientX - r.left) / r.width * T))];
}

function show(h, q, k) {
  const w = k <= q ? D.heads[h][q][k].toFixed(3) : "masked (key after the query)";
  $("readout").textContent = `head ${h} · query ${q} ${D.labels[q]} · key ${k} ${D.labels[k]} · weight ${w}`;
  for (const span of $("tokens").children) {
    const i = +span.dataset.pos, p = i <= q ? D.heads[h][q][i] : 0, rgb = colour(p);
    span.style.background = i <= q ? `rgba(${rgb[0]}, ${rgb[1]}, ${rgb[2]}, ${0.15 + 0.85 * p})` : "";
    span.style.color = p > 0.6 ? "#000" : "";
    span.dataset.weight = i <= q ? p.toFixed(3) : "";
    span.title = `${D.labels[i]}: ${i <= q ? p.toFixed(3) : "after the query"}`;
    span.classList.toggle("query", i === q);
  }
}

function select(h) {
  selected = h;
  for (const fig of $("grid").children) fig.classList.toggle("selected", +fig.dataset.head === h);
  $("big-title").textContent = `head ${h}`;
  paint($("big"), h);
}

function labels(box) {  // one label per row / column, beside the big map, while they can be read
  if (T > 64) return;
  for (let i = 0; i < T; i++) {
    const s = document.createElement("span");
    s.textContent = D.labels[i];
    box.appendChild(s);
  }
}

$("grid").style.setProperty("--cols", Math.ceil(Math.sqrt(H)));
for (let h = 0; h < H; h++) {
  const fig = document.createElement("figure"), canvas = document.createElement("canvas"), cap = document.createElement("figcaption");
  fig.dataset.head = h; canvas.className = "thumb"; cap.textContent = `head ${h}`;
  paint(canvas, h);
  canvas.addEventListener("mousemove", (e) => show(h, ...cell(canvas, e)));
  fig.addEventListener("click", () => select(h));
  fig.append(canvas, cap);
  $("grid").appendChild(fig);
}
$("big").addEventListener("mousemove", (e) => show(selected, ...cell($("big"), e)));
for (let i = 0; i < T; i++) {
  const span = document.createElement("span");
  span.dataset.pos = i;
  if (D.tokens[i].includes("\\n")) {  // a newline token: a visible mark before the break, so it can be hovered
    const mark = document.createElement("span");
    mark.className = "nl"; mark.textContent = "↵";
    span.append(mark, D.tokens[i]);
  } else {
    span.textContent = D.tokens[i];
  }
  span.addEventListener("mouseover", () => {  // this token as the query; the readout names its strongest key
    const row = D.heads[selected][i];
    show(selected, i, row.indexOf(Math.max(...row)));
  });
  $("tokens").appendChild(span);
}
labels($("qlabels")); labels($("klabels"));
$("legend").querySelector(".bar").style.background =
  `linear-gradient(to right, ${VIRIDIS.map((c) => `rgb(${c})`).join(", ")})`;
select(0);
show(0, T - 1, 0);
document.body.dataset.ready = "1";  // the tests wait for this: the script ran to its end
</script>
</body>
</html>
"""
