"""KVCache: the keys and values of every layer, preallocated once and written in place.

Shapes never change during generation ([n_layer, B, H, max_len, D] for keys and for values), so a decode
step is friendly to torch.compile and CUDA graphs, and no per-token torch.cat reallocates the history
(transformers' DynamicCache does). `length` counts the positions written so far; every row of a batch
has the same length (padding is on the left, described by the attention mask the caller passes).
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, n_layer: int, batch_size: int, n_head: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (n_layer, batch_size, n_head, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # positions filled, the same for every row and layer

    @classmethod
    def for_model(cls, config, batch_size: int, max_len: int | None = None, dtype=torch.float32, device=None):
        max_len = config.n_positions if max_len is None else max_len
        if not 0 < max_len <= config.n_positions:
            raise ValueError(f"KVCache max_len {max_len} must be in [1, n_positions={config.n_positions}]")
        return cls(config.n_layer, batch_size, config.n_head, max_len, config.head_dim, dtype, device)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write new (B, H, T, D) keys/values after the cached ones; return all (B, H, length + T, D) so far.

        The returned tensors are views into the buffers, not copies. `length` advances in `advance()`,
        called by the model once every layer has been written.
        """
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} cached + {k.shape[2]} new positions exceed its "
                             f"max_len {self.max_len}")
        if k.shape[0] != self.batch_size:
            raise ValueError(f"KV cache holds batch size {self.batch_size}, got keys for batch size {k.shape[0]}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def reorder(self, index: torch.Tensor | list[int]) -> None:
        """Rows follow `index` (beam search keeps the best beams): row b becomes old row index[b].

        Only what changes is copied: the rows with index[b] != b, at the `length` positions written so far; an
        identity (every beam continued itself) copies nothing. Positions from `length` on are neither read nor
        written. (The whole-buffer `k.copy_(k.index_select(1, index))` copied every row and all max_len positions
        each step: for 64 new tokens after a 32-token prompt, a third of them not yet written on average.)

        Which rows move is decided on the host, so a tensor `index` is read with tolist(): on an accelerator a
        device-to-host copy, which waits for the work queued before it. beam_search calls reorder just after its
        per-step sync, with nothing queued, so it costs one B * 8-byte transfer; pass a list to skip even that.
        """
        rows = index.tolist() if isinstance(index, torch.Tensor) else list(index)
        B = self.batch_size
        if len(rows) != B or not all(0 <= r < B for r in rows):
            raise ValueError(f"reorder index {rows} must hold {B} row numbers in [0, {B})")
        moved = [b for b in range(B) if rows[b] != b]
        if not moved or self.length == 0:
            return
        dst, src = torch.tensor([moved, [rows[b] for b in moved]], device=self.k.device)
        for buf in (self.k, self.v):
            written = buf[:, :, :, :self.length]      # (n_layer, B, H, length, D), a view
            # The right side is a gather into a temporary, made before anything is written: a row that moves may
            # be another's source. One gather and one index_put_ per buffer, all layers at once: on 2 busy CPU
            # cores this was steadier than index_select + index_copy_ and than a loop over layers (more, smaller
            # parallel ops), though per layer the temporary would stay in cache.
            written[:, dst] = written[:, src]

    def get_seq_length(self) -> int:  # transformers' name, for code written against its caches
        return self.length

    def __len__(self) -> int:
        return self.k.shape[0]

    def __repr__(self) -> str:
        n_layer, B, H, S, D = self.k.shape
        return (f"KVCache(n_layer={n_layer}, batch={B}, heads={H}, length={self.length}/{S}, head_dim={D}, "
                f"dtype={self.k.dtype})")


class StaticSlot:
    """The cache as a fixed-shape decode step sees it (compiled.py's StaticDecode; CUDA graphs).

    `update` writes the new keys/values at the position held in the (1,) long tensor `write_at` and returns the
    whole buffers (B, H, max_len, D): shapes and addresses never change from step to step, so torch.compile
    traces the step once. Which positions are valid is the attention mask's business
    (AttentionMask.static_decode); `advance` is left to the caller, outside the compiled region.
    """

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.write_at = torch.zeros(1, dtype=torch.long, device=cache.k.device)
        self.layers = torch.arange(len(cache), device=cache.k.device)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One index_put_ (tensor-indexed setitem) on the whole [L, B, H, max_len, D] buffer, the layer given as a
        # tensor too. Written as an in-place op on a view (cache.k[layer].index_copy_), the compiled graph
        # rebuilds the whole buffer (a functional select_scatter: every layer's cache copied every step, 2x 75 MB
        # at B=8 and 256 positions); on the buffer itself inductor writes just the new entries in place.
        at = self.layers[layer:layer + 1]   # (1,); the indexed entries: (1, B, H, D)
        self.cache.k[at, :, :, self.write_at] = k.permute(2, 0, 1, 3)
        self.cache.v[at, :, :, self.write_at] = v.permute(2, 0, 1, 3)
        return self.cache.k[layer], self.cache.v[layer]

    def advance(self, n: int) -> None:
        pass
