"""Base models behind one velocity interface: one module per model family (FLUX here; SD3 still lives in fdfo/sd3.py).

`fdfo.models.flux.FluxPolicy` (FLUX.1-dev, and its tiny offline twin in `fdfo.models.tiny_flux`) offers what the
sampler and the phases call on `fdfo.sd3.SD3Policy`; `fdfo.models.base` holds what the two have in common (dtype
layout, decoding, the PEFT adapter). docs/models.md says what each model supports and how it was checked.
"""
