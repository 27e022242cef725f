"""Pictures a person can open: grids of synthetic images with their kept-patch masks."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import torch

from smi.utils.io import atomic_write_bytes

__all__ = ["denormalize", "save_grid", "save_curves"]


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    return (x * s + m).clamp(0, 1)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    return plt


def _save_figure(fig, path: str | Path) -> Path:
    """Render ``fig`` to PNG bytes, write them atomically, close the figure."""
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def save_curves(
    path: str | Path, series: dict[str, Sequence[tuple[float, float | None]]], *, xlabel: str, ylabel: str,
    title: str = "", hlines: dict[str, float] | None = None,
) -> Path:
    """Write a PNG line plot: one line with markers per series, dashed horizontal reference lines.

    Up to 8 series share the axes with their legend; more get a legend beside the axes and a marker
    shape and line style per group of ten, so that no two lines look alike once the ten colours repeat.
    """
    plt = _pyplot()
    many = len(series) + len(hlines or {}) > 8
    fig, ax = plt.subplots(figsize=(11, 5) if many else (7, 4.5))
    for i, (label, points) in enumerate(series.items()):
        pts = [(x, y) for x, y in points if y is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="osv^D"[i // 10 % 5], linestyle=("-", ":", "-.")[i // 10 % 3],
                    markersize=3, color=f"C{i % 10}", label=label)
    for i, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, linestyle="--", linewidth=1, color=f"C{(len(series) + i) % 10}", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    else:
        ax.legend(fontsize=8)
    return _save_figure(fig, path)


def save_grid(
    images: torch.Tensor, masks: torch.Tensor | None, patch: int, path: str | Path, mean: Sequence[float],
    std: Sequence[float], titles: Sequence[str] | None = None, max_images: int = 64, columns: int = 8,
    dim_stopped: bool = False, outlines: torch.Tensor | None = None,
) -> Path:
    """Write a PNG grid; stopped patches are drawn in a flat dark blue so the mask is visible.

    ``dim_stopped``: stopped patches keep their content, darkened and tinted blue (for real images, where
    what was left out matters). ``outlines``: ``(N, H, W)`` pixel masks (e.g. an object's) drawn as green
    contours."""
    plt = _pyplot()
    n = min(len(images), max_images)
    px = denormalize(images[:n].float().cpu(), mean, std)  # (n, C, H, W) in [0, 1]
    if px.shape[1] == 1:
        px = px.expand(-1, 3, -1, -1)
    if masks is not None:
        gh, gw = px.shape[2] // patch, px.shape[3] // patch
        m = masks[:n].view(n, 1, gh, 1, gw, 1).expand(-1, 1, -1, patch, -1, patch).reshape(n, 1, *px.shape[2:])
        stopped = torch.tensor([0.05, 0.1, 0.3]).view(1, 3, 1, 1)
        px = torch.where(m.bool(), px, 0.25 * px + 0.4 * stopped if dim_stopped else stopped)
    cols = min(columns, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.6 * cols, 1.8 * rows), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.axis("off")
        if i < n:
            ax.imshow(px[i].permute(1, 2, 0).numpy(), interpolation="nearest")
            if outlines is not None:
                ax.contour(outlines[i].float().numpy(), levels=[0.5], colors="lime", linewidths=0.8)
            if titles is not None:
                ax.set_title(titles[i], fontsize=7)
    return _save_figure(fig, path)
