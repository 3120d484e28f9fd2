"""FDFO: Finite Difference Flow Optimization (see README)."""

from fdfo import quiet as _quiet

_quiet.install()  # drop transformers' "requires torchvision; falling back to ...Pil" notices (fdfo/quiet.py)
