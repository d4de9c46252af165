"""Only lorakit's own lines, unless asked for more.

On a machine without CUDA, torchao logs a "Failed to load" line for each CUDA kernel
library it cannot load, torch a deprecation line for each enum torchao registers, and
transformers draws progress bars while it reads a local model in seconds. None of it
says anything about the user's model or data. ``LORAKIT_VERBOSE=1`` (``lorakit
--verbose``) lets all of it through.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def verbose() -> bool:
    return os.environ.get("LORAKIT_VERBOSE", "") not in ("", "0")


def quiet_third_parties() -> None:
    """Raise the noisy loggers to ERROR, unless verbose; a level the user set stays theirs."""
    if verbose():
        return
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.ERROR)


def be_verbose() -> None:
    """Let third-party warnings and progress bars through from now on (``--verbose``)."""
    os.environ["LORAKIT_VERBOSE"] = "1"
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)


@contextmanager
def no_progress_bars() -> Iterator[None]:
    """transformers' progress bars off inside the block, unless verbose; the caller's
    setting is restored afterwards."""
    from transformers.utils import logging as transformers_logging

    enabled = transformers_logging.is_progress_bar_enabled()
    if not verbose():
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            transformers_logging.enable_progress_bar()
