"""Shared by the analysis tests: a tiny GPT-2 whose every parameter is random, and a left-padded batch."""
import torch

V = 101   # the vocabulary of the tiny models these tests build


def randomize(model, seed=0):
    """Every parameter random, LayerNorm weights around 1 and biases nonzero, so no identity holds by accident
    (GPT-2's init leaves biases 0 and LayerNorms 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.3 * noise if ("ln_" in name and name.endswith("weight")) else 0.3 * noise)
    return model.eval()


def left_padded():
    """(ids (3, 9), mask): row 0 unpadded, rows 1 and 2 with 3 and 5 padding positions on the left."""
    ids = torch.randint(0, V, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :5] = 0
    return ids, mask
