"""Silence the few warnings diffusers raises on every call that easel cannot act on, and the
log lines of its libraries that a user cannot act on either.

Under ``-W error`` (the test suite, and anyone running strict) they would fail a job.
Warning filters are process-wide before Python 3.14 and runs overlap in threads, so the first
run in installs the filters and the last run out restores them: one run ending never
unsilences another that is still going.
"""

from __future__ import annotations

import logging
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# numpy 2 deprecations that diffusers' schedulers trigger (``np.array(tensor)`` with torch 2.13)
# when they build their sigmas: harmless, not ours to fix.
_NUMPY_ARRAY_PROTOCOL = r"__array(_wrap)?__ (implementation doesn't accept|must accept)"
# Kandinsky's combined pipelines pass the deprecated ``callback_steps`` to their own decoder.
_CALLBACK_STEPS = r"`callback_steps` is deprecated"
# A LoRA trained on the UNet only is the common case; several adapters at once is the point.
_NO_TEXT_LORA = r"No LoRA keys associated to"
_MORE_ADAPTERS = r"Already found a `peft_config` attribute"
# Audio pipelines: Stable Audio's autoencoder uses torch's old weight_norm; its SDE scheduler's
# Brownian tree (torchsde, also DPM++ SDE's) warns about float rounding at the ends of its interval.
_WEIGHT_NORM = r".*weight_norm` is deprecated"
_BROWNIAN_ENDS = r"Should have t[ab]"

# transformers 5 logs, once per class, that an image processor "requires torchvision (not
# installed)" and falls back to the PIL one: easel must not install torchvision (its PyPI
# builds next to the CPU torch fail to load), and the PIL processors are what it uses.
_LIBRARY_LOG_LINES = {"transformers.utils.import_utils": ("requires torchvision (not installed)",)}


class _DropLines(logging.Filter):
    def __init__(self, texts: tuple[str, ...]) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in self.texts)


def quiet_library_logs() -> None:
    """Drop the library log lines above at their logger, whatever handlers it has; called
    when this package is imported, before anything here imports transformers."""
    for name, texts in _LIBRARY_LOG_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLines) for f in logger.filters):
            logger.addFilter(_DropLines(texts))


_lock = threading.Lock()
_users = 0
_saved: warnings.catch_warnings | None = None


@contextmanager
def quiet_warnings() -> Iterator[None]:
    """Silence only the known, harmless warnings of diffusers' own code."""
    global _users, _saved
    with _lock:
        if _users == 0:
            _saved = warnings.catch_warnings()
            _saved.__enter__()
            warnings.filterwarnings(
                "ignore", message=_NUMPY_ARRAY_PROTOCOL, category=DeprecationWarning
            )
            warnings.filterwarnings("ignore", message=_CALLBACK_STEPS, category=FutureWarning)
            warnings.filterwarnings("ignore", message=_NO_TEXT_LORA)
            warnings.filterwarnings("ignore", message=_MORE_ADAPTERS)
            warnings.filterwarnings("ignore", message=_WEIGHT_NORM, category=FutureWarning)
            warnings.filterwarnings("ignore", message=_BROWNIAN_ENDS, category=UserWarning)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0 and _saved is not None:
                _saved.__exit__(None, None, None)
                _saved = None
