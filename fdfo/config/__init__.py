"""Training configuration: the settings behind train.py's flags (`settings`: nested dataclasses, tyro turns their
attribute docstrings into --help), the named presets (`presets`), the batch geometry of docs/algorithm.md §5
(`geometry`) and the checks of the flags before anything loads (`checks`). Defaults are the published runs of
docs/algorithm.md §6. The names below are the package's public face: import them from `fdfo.config`.
"""

from fdfo.config.checks import check_config
from fdfo.config.geometry import Geometry, batch_geometry
from fdfo.config.presets import (
    PRESETS,
    SMOKE_PROMPTS,
    diffusion_nft_config,
    flow_grpo_config,
    lowmem24_config,
    sd35l_config,
    smoke_config,
    smoke_diffusion_nft_config,
    smoke_flow_grpo_config,
    smoke_flux_config,
)
from fdfo.config.settings import BaselineConfig, Config, SampleConfig, TrainConfig

__all__ = ["PRESETS", "SMOKE_PROMPTS", "BaselineConfig", "Config", "Geometry", "SampleConfig", "TrainConfig",
           "batch_geometry", "check_config", "diffusion_nft_config", "flow_grpo_config", "lowmem24_config",
           "sd35l_config", "smoke_config", "smoke_diffusion_nft_config", "smoke_flow_grpo_config", "smoke_flux_config"]
