"""nanogpt2: a readable GPT-2 in PyTorch that loads and saves Hugging Face checkpoints, with Triton attention."""
from .cache import KVCache
from .config import PRESETS, GPT2Config
from .model import GPT2Attention, GPT2Block, GPT2LMHeadModel, GPT2MLP, GPT2Model, GPT2Output
from .tokenizer import get_tokenizer
from .files import CheckpointError
from .quantization import dequantize, quantize

__version__ = "0.1.0"
__all__ = ["GPT2Config", "GPT2Model", "GPT2LMHeadModel", "GPT2Attention", "GPT2MLP", "GPT2Block", "GPT2Output",
           "KVCache", "get_tokenizer", "CheckpointError", "PRESETS", "quantize", "dequantize"]
