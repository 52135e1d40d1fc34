"""transformers, the reference nanogpt2 is checked against: imported in one place, quietly, with a clear error
when it is missing (it is a dev extra, not a dependency). Used by verify, the tests and the benchmarks."""
from __future__ import annotations

INSTALL_HINT = 'pip install "nanogpt2[dev]"'


class MissingReference(ImportError):
    """transformers is not installed; the message says how to install it."""


def hf_quiet():
    """The transformers module, its logging at errors only and progress bars off (they would interleave with
    our tables). Raises MissingReference, naming the install command, when transformers is not installed."""
    try:
        import transformers
    except ModuleNotFoundError as e:
        if e.name != "transformers":   # transformers is there but one of its own imports failed: show that
            raise
        raise MissingReference(f"this needs transformers, the reference implementation, which is not installed: "
                               f"{INSTALL_HINT}") from None
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers
