"""Third-party messages that say nothing to our users, filtered narrowly by their text.

Importing diffusers' `StableDiffusion3Pipeline` makes transformers log, once each,

    `SiglipImageProcessor` requires torchvision (not installed); falling back to `SiglipImageProcessorPil` ...
    `CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` ...

(the pipeline's module names those classes for its optional IP-adapter image encoder). This project does not install
torchvision on purpose, and the PIL image processors are the ones it means to use (rewards/clip.py says why their
scores are deterministic), so the fallback is the intended path, not a problem. Only that message is dropped: any
other transformers warning, and this one for a class without a PIL twin (no "falling back"), still shows. With
torchvision installed the message never appears.
"""

from __future__ import annotations

import logging
import re

TORCHVISION_FALLBACK = re.compile(r"^`\w+ImageProcessor` requires torchvision \(not installed\); falling back to "
                                  r"`\w+ImageProcessorPil` ")
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"  # the logger that emits it (transformers 5.x)


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not TORCHVISION_FALLBACK.match(record.getMessage())


def install() -> None:
    """Add the filter to transformers' import logger (by name: transformers itself is not imported); idempotent."""
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(f, _DropTorchvisionFallback) for f in logger.filters):
        logger.addFilter(_DropTorchvisionFallback())
