"""Pictures a person would rather look at than read: token maps (kept patches for a dropping policy, merged groups
for merging) and accuracy-vs-FLOPs curves (PNG)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch.fx import Interpreter  # noqa: E402

from spot_compile import ops  # noqa: E402
from spot_compile.ops.merging import tome_destinations, tome_merge  # noqa: E402
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


class _MergeRecorder(Interpreter):
    """Runs a merged graph and records, at each merge of the token stream, where each entering token goes."""

    def __init__(self, gm):
        super().__init__(gm)
        self.destinations: list[torch.Tensor] = []

    def run_node(self, n):
        if n.op == "call_function" and n.target is ops.merge_tokens:
            args, _ = self.fetch_args_kwargs_from_env(n)
            self.destinations.append(ops.merge_destinations(*args[2:5]))  # metric, num_special, keep
        elif n.op == "call_function" and n.target is tome_merge:  # merge_at="attention"
            tokens, _, metric, class_token, distill_token, keep = self.fetch_args_kwargs_from_env(n)[0]
            self.destinations.append(tome_destinations(metric, class_token, distill_token, tokens.shape[1] - keep))
        return super().run_node(n)


@torch.no_grad()
def merged_groups(sparse, x: torch.Tensor) -> list[torch.Tensor]:
    """Per stage, a (B, num_patches) long map: for each original patch token, the token it is merged into after that
    stage (its index among the stage's output tokens), composed across the stages."""
    rec = _MergeRecorder(sparse.graph_module)
    rec.run(x)
    ns = sparse.structure.num_special
    tokens = sparse.plan.stages[0].tokens_in if sparse.plan.stages else sparse.structure.tokens
    group = torch.arange(tokens).expand(x.shape[0], -1)
    maps = []
    for dest in rec.destinations:
        group = dest.gather(1, group)
        maps.append(group[:, ns:])
    return maps


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


def one_per_class(labels: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of `count` images: the first of each class in class order, then (with fewer classes than `count`)
    the next images of each class in turn."""
    labels = torch.as_tensor(labels)
    by_class = [torch.nonzero(labels == c).flatten() for c in labels.unique(sorted=True)]
    chosen, depth = [], 0
    while len(chosen) < min(count, len(labels)):
        chosen += [int(idx[depth]) for idx in by_class if depth < len(idx)][: count - len(chosen)]
        depth += 1
    return torch.tensor(chosen, dtype=torch.long)


def save_token_maps(images: torch.Tensor, maps_by_policy: dict[str, list[torch.Tensor]], path: Path, titles=None) -> None:
    """Rows: images (in colour where they have three channels); columns: for each policy, each stage's map. A
    bool map (`kept_patches`) shows the kept patches bright with a green tint and the dropped ones dimmed; a long map
    (`merged_groups`) fills each group of merged patches with its mean colour and outlines the groups in orange, as
    ToMe's visualisation does. At most five stages per policy are drawn, evenly spaced, the last among them. A legend
    under the grid says which is which."""
    n, _, height, width = images.shape
    cols = [(p, s) for p, maps in maps_by_policy.items() for s in _shown_stages(len(maps))]
    fig, axes = plt.subplots(n, len(cols) + 1, figsize=(1.6 * (len(cols) + 1), 1.6 * n + 0.5), squeeze=False)
    patches = next(iter(maps_by_policy.values()))[0].shape[1]
    grid_h = max(1, round((patches * height / width) ** 0.5))
    grid = (grid_h, patches // grid_h)
    # Small images are enlarged (nearest), so that a one-pixel outline is thin beside a patch.
    scale = max(1, -(-96 // min(height, width)))
    for i in range(n):
        img = display_image(torch.nn.functional.interpolate(images[i : i + 1].float(), scale_factor=scale, mode="nearest")[0])
        axes[i, 0].imshow(img)
        axes[i, 0].set_title(titles[i] if titles else "input", fontsize=7)
        for j, (policy, s) in enumerate(cols, start=1):
            stage_map = maps_by_policy[policy][s][i]
            if stage_map.dtype == torch.bool:
                picture, count = _kept_picture(img, stage_map.reshape(grid)), int(stage_map.sum())
            else:
                picture, count = _merged_picture(img, stage_map.reshape(grid)), int(stage_map.unique().numel())
            axes[i, j].imshow(picture)
            if i == 0:
                axes[i, j].set_title(f"{policy}\nstage {s + 1}: {count} tokens", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    kinds = {m[0].dtype == torch.bool for m in maps_by_policy.values()}
    legend = [text for kept, text in ((True, "dropping: kept patches bright with a green tint, dropped ones dimmed"),
                                      (False, "merging: each region is one token (the patches merged into it, in their "
                                               "mean colour), orange lines its border")) if kept in kinds]
    fig.text(0.5, 0.005, "; ".join(legend), ha="center", va="bottom", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    with atomic_file(path, "the picture") as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)


def _shown_stages(count: int, most: int = 5) -> list[int]:
    """Every stage, or `most` of them evenly spaced ending with the last (merging has a stage in every block)."""
    if count <= most:
        return list(range(count))
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def display_image(image: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) in [0, 1]: a colour image as it is, one channel repeated as grey."""
    image = image.float().clamp(0, 1)
    return (image if image.shape[0] == 3 else image.mean(0, keepdim=True).expand(3, -1, -1)).permute(1, 2, 0)


def _to_pixels(patch_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.nn.functional.interpolate(patch_map[None, None].float(), size=size, mode="nearest")[0, 0]


def _kept_picture(img: torch.Tensor, alive: torch.Tensor) -> torch.Tensor:
    alive = _to_pixels(alive, img.shape[:2])[..., None]
    green = torch.tensor([0.0, 1.0, 0.0])
    return img * (0.25 + 0.75 * alive) * (1 - 0.2 * alive) + 0.2 * alive * green


def _merged_picture(img: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    pixels = _to_pixels(groups, img.shape[:2]).long()
    flat = pixels.flatten()
    count = int(flat.max()) + 1
    sums = torch.zeros(count, 3).index_add_(0, flat, img.reshape(-1, 3))
    sizes = torch.zeros(count).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    picture = (sums / sizes.clamp_min(1)[:, None])[flat].reshape(img.shape)
    edge = torch.zeros(img.shape[:2], dtype=torch.bool)
    edge[:, 1:] |= pixels[:, 1:] != pixels[:, :-1]
    edge[1:, :] |= pixels[1:, :] != pixels[:-1, :]
    picture[edge] = torch.tensor([1.0, 0.55, 0.0])  # orange: visible over black, white and grey alike
    return picture


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
