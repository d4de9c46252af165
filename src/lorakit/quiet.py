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
import sys
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
    """The progress bars of transformers (and of diffusers and datasets, where the process
    has imported them) off inside the block, unless verbose; restored afterwards."""
    import importlib

    switched = []
    for package in ("transformers", "diffusers", "datasets"):
        if package != "transformers" and package not in sys.modules:
            continue  # it draws nothing here, and importing it would cost seconds
        bars = importlib.import_module(f"{package}.utils.logging")  # the same three calls in all three
        if not verbose() and bars.is_progress_bar_enabled():
            bars.disable_progress_bar()
            switched.append(bars)
    try:
        yield
    finally:
        for bars in switched:
            bars.enable_progress_bar()
