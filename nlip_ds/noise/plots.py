"""Picture of a noise-estimator fit: the normalized loss histogram with the fitted mixture on top.

Why an image: the two-bump shape (or its absence) tells at a glance whether the memorization effect has set in
and whether the estimator is trustworthy, which the scalar noise/* metrics do not. The result is an RGB uint8
(H, W, 3) array for TensorBoard's add_image(..., dataformats="HWC"). matplotlib (Agg, no pyplot state) is
imported only when a plot is drawn, so the training import path does not pay for it.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from nlip_ds.noise.gmm import GMMFit

logger = logging.getLogger(__name__)

_GROUPS = ((0, "clean", "tab:blue"), (1, "noisy", "tab:red"), (-1, "unlabeled", "tab:gray"))


def _histograms(x: torch.Tensor, flags: torch.Tensor | None, bins: int) -> list[tuple[str, str, np.ndarray]]:
    """(label, color, density counts (bins,)) per ground-truth group present, densities over all of x."""
    scale = bins / max(x.numel(), 1)  # counts -> density on [0, 1]
    if flags is None:
        return [("losses", "tab:gray", torch.histc(x, bins, 0.0, 1.0).numpy() * scale)]
    flags = flags.reshape(-1).cpu()
    return [(label, color, torch.histc(x[flags == value], bins, 0.0, 1.0).numpy() * scale)
            for value, label, color in _GROUPS if bool((flags == value).any())]


def _draw(ax, fit: GMMFit, hists: list, bins: int) -> None:
    edges = np.linspace(0.0, 1.0, bins + 1)
    baseline = np.zeros(bins)
    for label, color, density in hists:  # stacked, so the outline is the histogram of all losses
        ax.stairs(baseline + density, edges, baseline=baseline, fill=True, alpha=0.5, color=color, label=label)
        baseline = baseline + density
    grid = torch.linspace(0.0, 1.0, 400, dtype=torch.float64)
    components = fit.component_densities(grid).numpy()  # (400, 2)
    ax.plot(grid, components[:, 0], color="tab:blue", lw=1.5, ls="--", label="clean component")
    ax.plot(grid, components[:, 1], color="tab:red", lw=1.5, ls="--", label="noisy component")
    ax.plot(grid, components.sum(1), color="black", lw=1.5, label="mixture")
    ax.set_xlabel(f"normalized loss (raw [{fit.bounds[0]:.3g}, {fit.bounds[1]:.3g}])")
    ax.set_ylabel("density")
    ax.set_title(f"noise rate {fit.noise_rate:.3f}, separation {fit.separation:.2f}, {fit.n_samples} samples")
    ax.legend(fontsize="small")


def render_fit_histogram(fit: GMMFit, losses: torch.Tensor, flags: torch.Tensor | None = None, *,
                         bins: int = 100, size: tuple[float, float] = (6.4, 4.0), dpi: int = 100,
                         path: str | Path | None = None) -> np.ndarray:
    """Draw the histogram of `losses` (n,) (raw; normalized with the fit's bounds), stacked by ground-truth
    `flags` (n,) when given, with the fit's weighted component densities and their sum.

    Returns (H, W, 3) uint8 with H = size[1]·dpi and W = size[0]·dpi; also writes a PNG to `path` if given.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    x = fit.normalize(losses)
    finite = torch.isfinite(torch.as_tensor(losses).reshape(-1).cpu())
    flags = None if flags is None else torch.as_tensor(flags).reshape(-1).cpu()[finite]
    fig = Figure(figsize=size, dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    _draw(fig.add_subplot(), fit, _histograms(x[finite], flags, bins), bins)
    fig.tight_layout()
    canvas.draw()
    if path is not None:
        fig.savefig(path)
        logger.debug("render_fit_histogram: wrote %s", path)
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
