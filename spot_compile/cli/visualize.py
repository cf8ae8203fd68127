"""Pictures a person would rather look at than read: kept-token maps and accuracy-vs-FLOPs curves (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.fx import Interpreter  # noqa: E402

from spot_compile import ops  # noqa: E402
from spot_compile.serialization.files import atomic_file  # noqa: E402


class _PruneRecorder(Interpreter):
    """Runs a sparsified graph and records, at each prune of the token stream, which tokens it kept."""

    def __init__(self, gm):
        super().__init__(gm)
        self.stream_prunes = {n for n in gm.graph.nodes if n.target is ops.prune_tokens and "spot_block" in n.meta}
        self.kept: list[torch.Tensor] = []

    def run_node(self, n):
        if n in self.stream_prunes:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.kept.append(ops.kept_indices(*args[1:4]))  # scores, num_special, keep
        return super().run_node(n)


@torch.no_grad()
def kept_patches(sparse, x: torch.Tensor) -> list[torch.Tensor]:
    """Per stage, a (B, num_patches) bool map of which original patch tokens are still alive after it."""
    rec = _PruneRecorder(sparse.graph_module)
    rec.run(x)
    ns = sparse.structure.num_special
    total = sparse.structure.tokens
    origin = torch.arange(total).expand(x.shape[0], -1)  # original index of each live token
    maps = []
    for idx in rec.kept:
        origin = origin.gather(1, idx)
        alive = torch.zeros(x.shape[0], total, dtype=torch.bool).scatter(1, origin, True)
        maps.append(alive[:, ns:])
    return maps


def save_token_maps(images: torch.Tensor, maps_by_policy: dict[str, list[torch.Tensor]], path: Path, titles=None) -> None:
    """Rows: images; columns: for each policy, the patches kept after each stage (dropped ones dimmed)."""
    n = images.shape[0]
    cols = [(p, s) for p, maps in maps_by_policy.items() for s in range(len(maps))]
    fig, axes = plt.subplots(n, len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.6 * n), squeeze=False)
    side = int(next(iter(maps_by_policy.values()))[0].shape[1] ** 0.5)
    for i in range(n):
        img = images[i].mean(0)  # grey: one channel as it is, colour as its mean
        axes[i, 0].imshow(img, cmap="gray")
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=7)
        for j, (policy, s) in enumerate(cols, start=1):
            alive = maps_by_policy[policy][s][i].reshape(side, side).float()
            alive = torch.nn.functional.interpolate(alive[None, None], size=img.shape, mode="nearest")[0, 0]
            axes[i, j].imshow(img * (0.25 + 0.75 * alive), cmap="gray", vmin=0, vmax=1)
            axes[i, j].imshow(alive, cmap="Greens", alpha=0.25 * alive.numpy(), vmin=0, vmax=1)
            if i == 0:
                axes[i, j].set_title(f"{policy}\nstage {s + 1}: {int(maps_by_policy[policy][s][i].sum())}", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    with atomic_file(path, "the picture") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def save_accuracy_vs_flops(rows: list[dict], path: Path, dense_acc: float, title: str,
                           references: dict[str, float] | None = None) -> None:
    """One line per policy; `dense_acc` and each of `references` (label: top-1, e.g. a tuned control) horizontal."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = sorted((r["flops_ratio"], r["top1"]) for r in rows if r["policy"] == policy)
        ax.plot(*zip(*pts), marker="o", label=policy)
    ax.axhline(dense_acc, color="k", ls="--", lw=1, label=f"dense {dense_acc:.2f}%")
    for label, acc in (references or {}).items():
        ax.axhline(acc, color="k", ls=":", lw=1, label=f"{label} {acc:.2f}%")
    ax.set_xlabel("FLOPs, fraction of dense (torch FlopCounterMode)")
    ax.set_ylabel("top-1 % (held-out test split)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_file(path, "the picture") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
