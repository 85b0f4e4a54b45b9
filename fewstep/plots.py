"""Plots of 2-D samples, one look for every command that draws them (`fewstep sample`,
`fewstep eval`, training's sample files and `fewstep generate`), and the atomic PNG write of
every figure the project draws.

numpy and matplotlib only, no torch: `fewstep generate` (serving) draws with it too.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

AXIS_LIMIT = 3.0  # the 2-D datasets lie within [-1.5, 1.5]^2; fixed axes compare runs at a glance


def steps_title(method: str, steps: int) -> str:
    """'cud 1 step', 'cud 4 steps'."""
    return f"{method} {steps} step{'' if steps == 1 else 's'}"


def save_scatter(points, path, title: str = "", ref=None) -> None:
    """A 4x4-inch PNG of points [N, 2] (over reference points `ref`, in grey), on fixed axes
    [-3, 3]^2, widened to show every point when some fall outside (a diverged model is seen,
    not cut off). Written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = np.asarray(points, dtype=np.float64)
    finite = points[np.isfinite(points).all(axis=1)]
    lim = max(AXIS_LIMIT, 1.05 * float(np.abs(finite).max())) if len(finite) else AXIS_LIMIT
    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if ref is not None:
        ref = np.asarray(ref)
        ax.scatter(ref[:, 0], ref[:, 1], s=1, c="0.8", label="data")
    ax.scatter(points[:, 0], points[:, 1], s=1, c="C0", label="samples")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """A matplotlib figure -> a PNG file, written atomically (parent folders made); closes it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
