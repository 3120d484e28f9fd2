"""How a model or checkpoint name says where it comes from: the names of the base model, and whether a name is a
Hugging Face hub address. Shared by checkpoint resolution (fdfo/hub.py) and the offline check (fdfo/offline.py)."""

from __future__ import annotations

BASE_NAMES = ("", "base", "none")  # --checkpoint spellings of the base model itself
HUB_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")


def is_hub_address(name: str) -> bool:
    """`hf:ORG/REPO...`, a URL, or a hub host's address without its scheme (`huggingface.co/ORG/REPO`)."""
    return name.startswith("hf:") or "://" in name or name.lower().startswith(tuple(f"{h}/" for h in HUB_HOSTS))
