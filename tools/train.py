"""Train GPT-2 from scratch or fine-tune a checkpoint (fully or with LoRA) on a text file.

    python tools/train.py --data input.txt --n-layer 4 --n-head 4 --n-embd 64 --block-size 256
    python tools/train.py --data input.txt --init-from gpt2 --lora-r 8 --max-steps 500
    torchrun --nproc_per_node=2 tools/train.py --data input.txt ...     # DistributedDataParallel
    torchrun --nproc_per_node=8 tools/train.py ... --fsdp               # sharded (FSDP2); docs/TRAINING.md, Scaling
    python tools/train.py ... --resume                                  # continue the run in --out-dir

Every flag is a field of nanogpt2.train.TrainConfig (its defaults are there, once); the loop is
nanogpt2.train.train, its checkpoints nanogpt2.checkpoint. Ctrl-C saves a checkpoint and exits with status 130.
See docs/TRAINING.md.
"""
import sys

import torch

from nanogpt2.train import parse_args, train


def main(argv=None) -> int:
    cfg = parse_args(argv, prog="tools/train.py")
    try:
        result = train(cfg)
    finally:
        if torch.distributed.is_initialized():  # started by train() under torchrun
            torch.distributed.destroy_process_group()
    return 130 if result.interrupted else 0  # 128 + SIGINT, as a shell reports a Ctrl-C


if __name__ == "__main__":
    sys.exit(main())
