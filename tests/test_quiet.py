"""fdfo/quiet.py: transformers' torchvision-fallback notice is dropped on import of fdfo, and only that notice."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import fdfo  # noqa: F401  (installs the filter)
from fdfo.quiet import TRANSFORMERS_IMPORT_LOGGER

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_pipeline_prints_no_torchvision_notice():
    """Without torchvision (as installed here) importing diffusers' SD3 pipeline makes transformers log two
    "requires torchvision (not installed); falling back" lines; after `import fdfo` there are none."""
    proc = subprocess.run([sys.executable, "-c", "import fdfo; from diffusers import StableDiffusion3Pipeline"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and "torchvision" not in proc.stderr, proc.stderr


def _shown(message: str) -> bool:
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    return bool(logger.filter(logger.makeRecord(logger.name, logging.WARNING, __file__, 1, message, (), None)))


def test_the_filter_is_narrow():
    fallback = ("`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil` "
                "for backward compatibility. Install torchvision to use the default backend, or import "
                "`CLIPImageProcessorPil` directly to silence this warning.")
    assert not _shown(fallback)
    assert _shown("`CLIPImageProcessor` requires torchvision (not installed)")  # no PIL twin to fall back to
    assert _shown("Could not load PIL fallback CLIPImageProcessorPil")
    assert _shown("some other warning mentioning torchvision")
