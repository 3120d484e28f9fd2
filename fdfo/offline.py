"""Without a network: one check before the first download instead of minutes of retries.

huggingface_hub retries a file it cannot fetch and does not have with exponential backoff (1 + 2 + 4 + 8 + 8 s, a
warning line each), and loaders try file after file: without a network, the smoke run with the PickScore reward printed
45 retry lines over 238 s before its error (2 cores, huggingface_hub 2.4). The entry
points therefore call `ensure_hub_reachable` with the models they are about to load: when one may come from the hub and
HF_HUB_OFFLINE is not set, one request to the endpoint decides, once per process, and an unreachable hub is said in one
line and turns the process offline (cached models load as usual, a cache miss fails at once).
"""

from __future__ import annotations

import os
from pathlib import Path

from fdfo import distributed as dist
from fdfo.hub_names import BASE_NAMES, is_hub_address

_hub_checked = False


def needs_hub(name: str | None) -> bool:
    """Whether loading `name` (a model id, folder or checkpoint address) may download from the Hugging Face hub."""
    if not name or name.startswith("builtin:") or name.strip().lower() in BASE_NAMES:
        return False
    if is_hub_address(name):
        return True
    return not Path(name).expanduser().exists()


def hub_problem(timeout: float | None = None) -> str | None:
    """None when the hub endpoint (HF_ENDPOINT) answers one HTTP request, else why not (one line). Any answer below
    500 counts: the check is about the network, not about a repository."""
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    timeout = constants.HF_HUB_ETAG_TIMEOUT if timeout is None else timeout
    try:
        response = get_session().request("HEAD", constants.ENDPOINT, timeout=timeout, follow_redirects=False)
    except Exception as e:  # DNS, refused connection, timeout, TLS or proxy failure: httpx raises assorted types
        detail = str(e).splitlines()[0] if str(e) else ""
        return f"{e.__class__.__name__}{': ' + detail if detail else ''}"
    if response.status_code >= 500 or response.status_code == 407:
        return f"HTTP {response.status_code}"
    return None


def ensure_hub_reachable(names) -> None:
    """Call before loading `names` (model ids, folders, checkpoint addresses). When one of them may come from the hub
    and HF_HUB_OFFLINE is not set, check once per process that the hub answers. If it does not, say so in one line and
    switch this process to offline mode: what the local cache holds loads as usual, and what it lacks fails at once
    with one error, instead of huggingface_hub's retries with backoff (about 23 s per file, minutes per model)."""
    global _hub_checked
    from huggingface_hub import constants

    wanted = [n for n in names if needs_hub(n)]
    if _hub_checked or not wanted or constants.HF_HUB_OFFLINE:
        return
    _hub_checked = True
    problem = hub_problem()
    if problem is None:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"  # libraries imported later, and child processes
    constants.HF_HUB_OFFLINE = True  # huggingface_hub refuses every request from now on, without retrying
    dist.warn0(f"the Hugging Face hub {constants.ENDPOINT} cannot be reached ({problem}); using only the local cache "
               f"({constants.HF_HUB_CACHE}) for {', '.join(dict.fromkeys(wanted))}. Without network access, set "
               f"HF_HUB_OFFLINE=1 to skip this check.")


def reward_sources(specs, reward_cfg, preset: str | None = None) -> list[str]:
    """The model ids / folders the reward terms `specs` ("kind:weight[:question]"; none given: those of the reward
    preset `preset`) load; malformed specs and unknown presets are left to the reward builder to report."""
    from rewards.build import CLIP_KINDS, PRESETS, VLM_KINDS, parse_spec

    specs = specs or PRESETS.get(preset, ())
    sources = []
    for spec in specs:
        try:
            kind = parse_spec(spec).kind
        except ValueError:
            continue
        if kind in CLIP_KINDS:
            sources += [getattr(reward_cfg, option) for option in CLIP_KINDS[kind][:2]]
        elif kind in VLM_KINDS:
            sources.append(reward_cfg.vlm_model)
    return sources
