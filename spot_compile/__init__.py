"""spot-compile: token reduction for Vision Transformers as a torch.export / torch.fx compiler pass.

    import spot_compile
    sparse = spot_compile.sparsify(model, spot_compile.SparsifyConfig(budget=0.6))
    print(sparse.plan.flops_ratio)
    fast = sparse.compiled()

The public names load on first use (PEP 562), so that importing a config module (`spot_compile.config`,
`spot_compile.policy_configs`, `spot_compile.calibration.config`) loads no pass, no model code and not torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_PUBLIC = {
    "SparseViT": "spot_compile.api",
    "sparsify": "spot_compile.api",
    "CalibrationConfig": "spot_compile.calibration.config",
    "calibrate": "spot_compile.calibration.trainer",
    "SparsifyConfig": "spot_compile.config",
    "SpotError": "spot_compile.errors",
    "load": "spot_compile.serialization.artifact",
    "save": "spot_compile.serialization.artifact",
    **{name: "spot_compile.policy_configs" for name in
       ("ClassAttentionConfig", "GivenScorersConfig", "MergeConfig", "PolicyConfig", "RandomConfig", "SpotConfig")},
}

__all__ = ["CalibrationConfig", "ClassAttentionConfig", "GivenScorersConfig", "MergeConfig", "PolicyConfig", "RandomConfig",
           "SparseViT", "SparsifyConfig", "SpotConfig", "SpotError", "calibrate", "load", "save", "sparsify"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from spot_compile.api import SparseViT, sparsify
    from spot_compile.calibration.config import CalibrationConfig
    from spot_compile.calibration.trainer import calibrate
    from spot_compile.config import SparsifyConfig
    from spot_compile.errors import SpotError
    from spot_compile.policy_configs import ClassAttentionConfig, GivenScorersConfig, MergeConfig, PolicyConfig, RandomConfig, SpotConfig
    from spot_compile.serialization.artifact import load, save


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'spot_compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
