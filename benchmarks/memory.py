"""Memory versus sequence length, nanogpt2 vs transformers, same weights.

    python benchmarks/memory.py [--quick] [--csv out.csv] [--device cuda --dtype bfloat16]

Two figures per sequence length T (batch 1):
  * activation MiB: bytes autograd saves for backward in a training forward (what gradient checkpointing
    trades for compute), counted exactly with torch.autograd.graph.saved_tensors_hooks on any device;
  * peak MiB (GPU only): torch.cuda.max_memory_allocated over an inference forward, minus the weights.
Attention itself is O(T) in memory in the fused/SDPA paths; the eager path materialises (H, T, T).
"""
import torch

from common import Table, base_parser, machine_line, model_pair


def saved_bytes(model, ids) -> int:
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.dtype)
        if key not in seen:  # a tensor saved by several ops counts once
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(lambda t: pack(t) if t.untyped_storage().data_ptr() not in params
                                                  else t, lambda t: t):
        model(ids, labels=ids).loss
    return total


def peak_inference(model, ids):
    """MiB allocated by one inference forward beyond what was allocated before (CUDA only; "n/a" on CPU, where
    PyTorch keeps no allocator statistics)."""
    if not torch.cuda.is_available():
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.inference_mode():
        model(ids)
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def main():
    args = base_parser(__doc__).parse_args()
    lengths = [16, 64] if args.quick else [128, 256, 512, 1024]
    print(machine_line())
    ours, hf = model_pair(args, hf_attn="sdpa")
    _, hf_eager = model_pair(args, hf_attn="eager")
    for m in (ours, hf, hf_eager):
        m.train()
    print(f"# memory vs T, batch 1, {args.dtype}; activations saved for backward (MiB), inference peak (GPU)")
    table = Table([("T", 6), ("ours act MiB", 14), ("hf-sdpa act", 13), ("hf-eager act", 14), ("ours/sdpa", 11),
                   ("ours peak", 11), ("hf peak", 9)])
    for T in lengths:
        ids = torch.randint(0, ours.config.vocab_size, (1, T), device=args.device)
        torch.manual_seed(0)
        a, b, c = (saved_bytes(m, ids) / 2**20 for m in (ours, hf, hf_eager))
        for m in (ours, hf):
            m.eval()
        pa, pb = peak_inference(ours, ids), peak_inference(hf, ids)
        for m in (ours, hf):
            m.train()
        table.add(T, a, b, c, a / b, pa, pb)   # saved activations: the training-memory part that grows with T
    table.write_csv(args.csv)


if __name__ == "__main__":
    main()
