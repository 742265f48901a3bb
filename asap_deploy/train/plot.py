"""Loss-curve PNG (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_path


def plot_losses(history: list[dict[str, float]], path: str | Path) -> Path:
    """Generator losses on the left, discriminator losses on the right, against the step."""
    from ..errors import require_module

    matplotlib = require_module("matplotlib", "the loss curve (loss_curve.png)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    keys = sorted({k for h in history for k in h if k != "step"})
    groups = [[k for k in keys if k.startswith("G")], [k for k in keys if k.startswith("D")]]
    groups = [g for g in groups if g]
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 3.6), squeeze=False)
    for ax, group, title in zip(axes[0], groups, ("generator", "discriminator")):
        for k in group:
            ax.plot(steps, [h.get(k, float("nan")) for h in history], label=k, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_title(f"{title} losses")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)
