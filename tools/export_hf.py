"""Turn a sharded (--fsdp) training checkpoint into a Hugging Face checkpoint that transformers loads.

    python tools/export_hf.py --checkpoint runs/xl --out runs/xl-hf                 # config.json + model.safetensors
    python tools/export_hf.py --checkpoint runs/xl --out runs/xl-hf --dtype bfloat16

Reads --checkpoint's sharded/ folder (torch.distributed.checkpoint, written by any number of ranks) into one plain
model on the CPU, in this process alone (no torchrun, no process group; memory: one model), folds LoRA adapters
into their base (the run's --init-from, which must still resolve), casts to --dtype and writes save_pretrained's
files. Nothing is unpickled but plain data and DCP's metadata classes (nanogpt2.checkpoint). A run without --fsdp
needs no export: its --out-dir is a Hugging Face checkpoint (or PEFT adapter) already; `tools/train.py
--export-dir` does the same at the end of a run, sharded or not.
"""
import sys
from dataclasses import dataclass

from nanogpt2.dtypes import DTYPES, FLAG_CHOICES
from nanogpt2.flags import dataclass_parser, flag
from nanogpt2.train import export_sharded


@dataclass
class ExportConfig:
    checkpoint: str = flag("a --fsdp run's --out-dir (holding sharded/, config.json, training_state.pt)", default="")
    out: str = flag("directory to write the Hugging Face checkpoint to", default="")
    dtype: str = flag(f"dtype of the written weights: {', '.join(FLAG_CHOICES)}", default="float32")


def main(argv=None) -> int:
    cfg = ExportConfig(**vars(dataclass_parser(ExportConfig, "tools/export_hf.py", __doc__.split("\n")[0],
                                               required=("checkpoint", "out")).parse_args(argv)))
    if cfg.dtype not in DTYPES:
        raise SystemExit(f"--dtype {cfg.dtype!r} is not one of {', '.join(FLAG_CHOICES)}")
    try:
        export_sharded(cfg.checkpoint, cfg.out, cfg.dtype)
    except (FileNotFoundError, ValueError) as e:  # CheckpointError (a ValueError), DCP failures too: no traceback
        raise SystemExit(f"tools/export_hf.py: {e}") from None
    print(f"exported {cfg.checkpoint} as a {cfg.dtype} Hugging Face checkpoint in {cfg.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
