"""The models that ship with the package, small ViTs trained here (recipes/train_dense.py): one on Fashion-MNIST, and
one on cluttered Fashion-MNIST (recipes/cluttered_fmnist.py), where the garment's place varies per image."""

from __future__ import annotations

from pathlib import Path

from spot_compile.errors import CheckpointError
from spot_compile.models.vit import ViT, ViTConfig
from spot_compile.serialization.checkpoints import load_tensors

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED_MODEL = ASSETS / "fmnist_vit.pt"
SHIPPED_PREDICTORS = ASSETS / "fmnist_spot_predictors.pt"
CLUTTERED_MODEL = ASSETS / "cluttered_fmnist_vit.pt"


def load_shipped_model(path: Path = SHIPPED_MODEL) -> tuple[ViT, dict]:
    """The trained dense baseline (eval mode) and its recorded metrics."""
    if not path.is_file():
        raise CheckpointError(f"shipped model missing at {path}; train it with: python recipes/train_dense.py")
    ckpt = load_tensors(path)
    model = ViT(ViTConfig(**ckpt["config"]))
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt.get("metrics", {})
