"""Filters for library log messages and warnings that are known to be harmless here and would bury a script's own output. Each
drops one exact message on the one logger that emits it; everything else those libraries log still shows.

Importing this module installs them, and utils/__init__.py imports it, so importing anything from utils/ first puts
them in place; the scripts that import libraries before utils/ import this module first, since some messages come at
import time."""
import contextlib
import logging
import re
import warnings

# bitsandbytes (imported by transformers' TrainingArguments through accelerate, and by peft) tries at import to fetch
# a CPU 4-bit kernel from the Hugging Face Hub, which it does not trust by default, and falls back to its own code.
BITSANDBYTES_CPU_KERNEL = ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community")
ANSI_CODES = re.compile(r"\x1b\[[0-9;]*m")


class DropMessage(logging.Filter):
    """Drops the records whose message starts with `start`."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def filter(self, record):
        return not record.getMessage().startswith(self.start)


class DropLoadReportOfMissing(logging.Filter):
    """Drops transformers' load report ("<Model> LOAD REPORT ... MISSING ... Consider training") when every key it
    lists is a MISSING one under `prefix`; a report that lists anything else is kept whole."""

    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def filter(self, record):
        message = ANSI_CODES.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        table = message.split("\n\nNotes:")[0].splitlines()[1:]  # after the "... LOAD REPORT from: <folder>" line
        rows = [[cell.strip() for cell in line.split("|")] for line in table if "|" in line and not line.startswith("Key ")]
        return not rows or not all(len(row) > 1 and row[0].startswith(self.prefix) and row[1] == "MISSING" for row in rows)


@contextlib.contextmanager
def missing_keys_expected(prefix):
    """Within the block, transformers' load report is dropped if the only keys it lists are missing ones under
    `prefix` (e.g. a P-tuning prefix encoder that the caller loads or trains right after)."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop = DropLoadReportOfMissing(prefix)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


# On import (utils/__init__.py imports this module, once a process).
logging.getLogger(BITSANDBYTES_CPU_KERNEL[0]).addFilter(DropMessage(BITSANDBYTES_CPU_KERNEL[1]))
# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` whenever it wraps a model (PeftModel.__init__),
# which warns on every adapter load from transformers 5.2x; nothing of ours calls it.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
