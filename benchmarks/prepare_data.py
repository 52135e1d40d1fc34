"""Tokenizing speed of tools/prepare_data.py against tiktoken's own rate, on tinyshakespeare (tokens/s).

    python benchmarks/prepare_data.py [--copies 16] [--repeats 3]

Two corpora: tinyshakespeare itself (1.1 MB, one file, ~338k tokens) and a folder of --copies copies of it
(the steady state, where start-up costs vanish). Rows, run alternately (common.paired), medians:
  tiktoken 1 call      enc.encode_ordinary(whole text): one thread, no I/O (the per-core ceiling)
  tiktoken batch       enc.encode_ordinary_batch(units, num_threads=cores) on the same 256 KiB pieces the
                       pipeline cuts: tiktoken's own parallel rate, no I/O (the goal's ceiling)
  prepare_data w=N     the whole job in this process: hash, plan, read, tokenize in N worker processes,
                       write shards + manifest (fsync'd), into a fresh folder each time
The load average is printed before and after: other processes on the machine slow every row alike.
"""
import importlib.util
import os
import shutil
import sys
import tempfile

from common import Table, base_parser, machine_line, paired

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAKESPEARE = os.path.join(ROOT, "nanogpt2", "assets", "data", "tinyshakespeare.txt")


def load_tool():
    spec = importlib.util.spec_from_file_location("prepare_data", os.path.join(ROOT, "tools", "prepare_data.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["prepare_data"] = module   # worker processes find tokenize_unit by this name
    spec.loader.exec_module(module)
    return module


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"# load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"


def main():
    p = base_parser(__doc__)
    p.add_argument("--copies", type=int, default=16, help="copies of tinyshakespeare in the larger corpus")
    args = p.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    copies = 2 if args.quick else args.copies
    print(machine_line())
    print(load_line(), flush=True)
    pd = load_tool()
    enc = pd.get_tokenizer()
    cores = pd.available_cpus()
    workers = sorted({1, cores})
    tmp = tempfile.mkdtemp(prefix="nanogpt2-prepare-bench-")
    try:
        folder = os.path.join(tmp, "copies")
        os.makedirs(folder)
        for i in range(copies):
            shutil.copy(SHAKESPEARE, os.path.join(folder, f"shakespeare_{i:03d}.txt"))
        table = Table([("corpus", 24), ("MB", 7), ("tokens", 11), ("method", 22), ("s", 8), ("Mtok/s", 8),
                       ("vs batch", 9)])
        for name, path in [("tinyshakespeare", SHAKESPEARE), (f"{copies} x tinyshakespeare", folder)]:
            cfg = pd.PrepareConfig(input=path, out="", progress=False)
            sources = pd.find_sources(path)
            units, _ = pd.plan(sources, cfg)
            pieces = []                                   # the pipeline's units as text, for tiktoken's batch
            for u in units["train"] + units["val"]:
                for piece in u.pieces:
                    with open(piece.path, "rb") as f:
                        f.seek(piece.start)
                        pieces.append(f.read(piece.stop - piece.start).decode("utf-8"))
            whole = "".join(pieces)
            runs = iter(range(10**6))

            def job(w):
                def run():
                    out = os.path.join(tmp, f"out{next(runs)}")
                    pd.prepare(pd.PrepareConfig(input=path, out=out, workers=w, progress=False), log=lambda *a: None)
                    shutil.rmtree(out)
                return run

            fns = {"tiktoken 1 call": lambda: enc.encode_ordinary(whole),
                   f"tiktoken batch t={cores}": lambda: enc.encode_ordinary_batch(pieces, num_threads=cores)}
            fns.update({f"prepare_data w={w}": job(w) for w in workers})
            times = paired(fns, repeats, warmup=0 if args.quick else 1)
            # what prepare_data writes: the pieces' tokens and one end-of-text per (non-empty) file
            n_tokens = sum(map(len, enc.encode_ordinary_batch(pieces))) + sum(1 for s in sources if s.size)
            mb = sum(s.size for s in sources) / 1e6
            batch = n_tokens / times[f"tiktoken batch t={cores}"]
            for method, seconds in times.items():
                rate = n_tokens / seconds
                table.add(name, round(mb, 1), n_tokens, method, round(seconds, 3), round(rate / 1e6, 2),
                          f"{rate / batch:.2f}x")
        print(load_line())
        table.write_csv(args.csv)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
