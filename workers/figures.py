"""Pictures for a job's MLflow run, as HxWx3 uint8 arrays: tile grids (dictionaries, filters,
reconstructions, samples) and energy landscapes over the plane for 2-D data."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

# Tiles are upscaled by a whole factor until they are at least this many pixels wide, so an
# 8x8 atom is visible without interpolation blurring it.
MIN_TILE_PIXELS = 32
LANDSCAPE_RESOLUTION = 120  # grid points per axis


def is_plane(data: torch.Tensor) -> bool:
    """True for 2-D vector data (builtin:spiral), whose energy can be drawn over the plane."""
    return data.dim() == 2 and data.shape[1] == 2


def tile_grid(
    tiles: torch.Tensor, columns: int | None = None, symmetric: bool = True
) -> np.ndarray:
    """Lay out ``tiles`` (n, C, h, w), C in {1, 3}, as one picture with 1-pixel gaps.

    ``symmetric``: each tile is scaled on its own so that 0 is mid-grey (filters, atoms);
    otherwise the whole grid shares one min-max range (data next to its reconstruction)."""
    tiles = tiles.detach().float().cpu()
    count, channels, height, width = tiles.shape
    if symmetric:
        scale = tiles.flatten(1).abs().amax(1).clamp_min(1e-12).view(-1, 1, 1, 1)
        tiles = 0.5 + 0.5 * tiles / scale
    else:
        low, high = tiles.min(), tiles.max()
        tiles = (tiles - low) / (high - low).clamp_min(1e-12)
    tiles = tiles.expand(-1, 3, -1, -1) if channels == 1 else tiles
    factor = max(1, math.ceil(MIN_TILE_PIXELS / max(height, width)))
    tiles = tiles.repeat_interleave(factor, 2).repeat_interleave(factor, 3)
    columns = columns or math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    tile_h, tile_w = height * factor, width * factor
    canvas = torch.ones(3, rows * (tile_h + 1) + 1, columns * (tile_w + 1) + 1)
    for index in range(count):
        top, left = 1 + (index // columns) * (tile_h + 1), 1 + (index % columns) * (tile_w + 1)
        canvas[:, top : top + tile_h, left : left + tile_w] = tiles[index]
    return (canvas.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def stacked_grid(versions: list[torch.Tensor], count: int = 32, columns: int = 8) -> np.ndarray:
    """The first ``count`` samples in blocks of ``columns``, each block shown once per version
    (clean, corrupted, reconstructed ...) one row under the other, on one shared grey scale."""
    count = min(count, len(versions[0]))
    rows = [
        version[start : min(start + columns, count)]
        for start in range(0, count, columns)
        for version in versions
    ]
    return tile_grid(torch.cat(rows), columns=columns, symmetric=False)


def energy_landscape(
    energy: Callable[[torch.Tensor], torch.Tensor],
    data: torch.Tensor,
    title: str,
    marks: torch.Tensor | None = None,
) -> np.ndarray:
    """Filled contours of ``energy`` ((m, 2) points -> (m,) energies) over the box around
    ``data`` (n, 2), with the data drawn on top and optional ``marks`` (prototypes, atoms)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = data.detach().float().cpu()
    low, high = points.min(0).values, points.max(0).values
    margin = 0.25 * (high - low)
    xs = torch.linspace(low[0] - margin[0], high[0] + margin[0], LANDSCAPE_RESOLUTION)
    ys = torch.linspace(low[1] - margin[1], high[1] + margin[1], LANDSCAPE_RESOLUTION)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    plane = torch.stack([grid_x.flatten(), grid_y.flatten()], 1).to(data)
    values = torch.cat([energy(chunk) for chunk in plane.split(4096)]).float().cpu()
    values = values.view(LANDSCAPE_RESOLUTION, LANDSCAPE_RESOLUTION).numpy()

    figure = Figure(figsize=(5, 4.5), dpi=100)
    axes = figure.add_subplot()
    # The box's far corners can sit orders of magnitude above the data: colour up to the 90th
    # percentile so the valleys stay visible, and paint what lies above in the top colour.
    top = float(np.percentile(values, 90))
    levels = np.linspace(values.min(), max(top, values.min() + 1e-6), 30)
    filled = axes.contourf(
        grid_x.numpy(), grid_y.numpy(), values, levels=levels, cmap="viridis", extend="max"
    )
    figure.colorbar(filled, ax=axes, label="energy")
    axes.scatter(points[:, 0], points[:, 1], s=3, c="white", alpha=0.6, linewidths=0)
    if marks is not None:
        marks = marks.detach().float().cpu()
        axes.scatter(marks[:, 0], marks[:, 1], s=30, c="red", marker="x")
    axes.set_title(title)
    axes.set_aspect("equal")
    figure.tight_layout()
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
