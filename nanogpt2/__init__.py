"""nanogpt2: a readable GPT-2 in PyTorch that loads and saves Hugging Face checkpoints, with Triton attention."""
import os as _os
import sys as _sys

# The repository's top-level kernels/ folder installs as nanogpt2.kernels. Run from a checkout's root
# (`python -m nanogpt2 ...`), Python puts that root on sys.path, where kernels/ would pose as PyPI's
# unrelated `kernels` package, which transformers imports whenever it finds one. nanogpt2 itself is
# reachable through its (editable) install, so the root comes off the path.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _root]

from .cache import KVCache
from .config import PRESETS, GPT2Config
from .model import GPT2Attention, GPT2Block, GPT2LMHeadModel, GPT2MLP, GPT2Model, GPT2Output
from .tokenizer import get_tokenizer
from .weights import CheckpointError

__version__ = "0.1.0"
__all__ = ["GPT2Config", "GPT2Model", "GPT2LMHeadModel", "GPT2Attention", "GPT2MLP", "GPT2Block", "GPT2Output",
           "KVCache", "get_tokenizer", "CheckpointError", "PRESETS"]
