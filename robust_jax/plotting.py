"""Figures (matplotlib, Agg backend): each function writes one PNG and returns its path.

Conventions: series are told apart by colour *and* line style / marker (:data:`STYLES`), so overlapping curves stay
distinguishable; legends with several entries sit outside the axes, never on the data; budgets are labelled as
written on the command line (:func:`eps_label`: ``8/255``, not ``0.0314``); callers put N in every title.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # "tight": keeps legends placed outside the axes
    _plt().close(fig)
    return path


# (linestyle, marker) per series, in order; colours follow matplotlib's default cycle
STYLES = (("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ("-", "v"), ("--", "P"), ("-.", "X"), (":", "*"))


def style(i: int) -> dict:
    """Keyword arguments giving series `i` its own line style and marker."""
    ls, marker = STYLES[i % len(STYLES)]
    return {"ls": ls, "marker": marker}


def eps_label(v: float) -> str:
    """A perturbation budget as people write it: ``8/255`` when it is a whole number k/255 with k <= 32 (the
    CIFAR-10 convention), else the number (``0.3``); ``0`` for no attack."""
    k = float(v) * 255
    if v and abs(k - round(k)) < 1e-6 and 1 <= round(k) <= 32:
        return f"{round(k)}/255"
    return f"{float(v):g}"


def _legend(ax, n: int, *, inside_up_to: int = 0, **kw):
    """A legend inside the axes (best place) for at most `inside_up_to` entries, else outside on the right."""
    if n <= inside_up_to:
        return ax.legend(fontsize=8, **kw)
    return ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False, **kw)


def histograms(series: dict[str, np.ndarray], path, *, xlabel: str, title: str = "", bins: int = 50,
               vlines: dict[str, float] | None = None) -> Path:
    """Overlaid density histograms of several 1-D series on shared bins."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    allv = np.concatenate([np.asarray(v).ravel() for v in series.values()])
    edges = np.linspace(np.percentile(allv, 0.5), np.percentile(allv, 99.5), bins + 1)
    for name, v in series.items():
        ax.hist(np.asarray(v).ravel(), bins=edges, alpha=0.45, density=True, label=name)
    for name, x in (vlines or {}).items():
        ax.axvline(x, color="k", ls="--", lw=1.2, label=name, zorder=3)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title, fontsize=10)
    _legend(ax, len(series) + len(vlines or {}), inside_up_to=4)
    return _save(fig, path)


def lines(x, ys: dict[str, np.ndarray], path, *, xlabel: str, ylabel: str, title: str = "",
          yerr: dict[str, np.ndarray] | None = None, logx: bool = False, xticklabels: list[str] | None = None) -> Path:
    """Line plots of several series over the same x; `xticklabels` labels the x values (e.g. ``eps_label``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, y) in enumerate(ys.items()):
        if yerr and name in yerr:
            ax.errorbar(x, y, yerr=yerr[name], capsize=3, label=name, **style(i))
        else:
            ax.plot(x, y, label=name, **style(i))
    if logx:
        ax.set_xscale("symlog", linthresh=0.1)
    if xticklabels is not None:
        ax.set_xticks(list(x))
        ax.set_xticklabels(xticklabels, fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(ys) > 1:
        _legend(ax, len(ys))
    return _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path, *, title: str = "",
               points: dict[str, tuple[float, float]] | None = None) -> Path:
    """ROC curves {name: (fpr, tpr, auroc)}, each with its own line style and markers, drawn inside a small margin
    so that curves along the edges (AUROC 0 or 1) do not hide the frame, nor each other; the legend sits outside.
    `points` {name: (fpr, tpr)} marks operating points (e.g. the deployed threshold)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    n = len(curves)
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})", lw=1.6, ms=5, markevery=0.08, mfc="none",
                zorder=3 + n - i, **style(i))
    for name, (fpr, tpr) in (points or {}).items():
        ax.plot([fpr], [tpr], "k*", ms=11, zorder=4 + n, label=name)
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance", zorder=1)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.03, 1.03)
    ax.set_aspect("equal")
    ax.grid(alpha=0.25, zorder=0)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (detection rate)")
    ax.set_title(title, fontsize=10)
    _legend(ax, n + 1 + len(points or {}))
    return _save(fig, path)


def reliability_diagram(rel: dict[str, np.ndarray], path, *, title: str = "") -> Path:
    """Bar chart of per-bin accuracy vs confidence (from ``metrics.reliability``)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    edges = rel["edges"]
    centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    mask = rel["count"] > 0
    ax.bar(centers[mask], rel["accuracy"][mask], width=widths[mask], edgecolor="k", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", label="perfect calibration")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, path)


def scatter(points: dict[str, tuple[float, float]], path, *, xlabel: str, ylabel: str, title: str = "",
            paths: dict[str, list[str]] | None = None) -> Path:
    """Labelled points {name: (x, y)}, e.g. one model per point on a robustness trade-off plane; ``paths``
    {label: [names]} joins named points in order with a labelled line (e.g. a series of training strengths)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, (label, names) in enumerate((paths or {}).items()):
        pts = np.array([points[n] for n in names if n in points])
        ax.plot(pts[:, 0], pts[:, 1], ls=STYLES[(i + 1) % len(STYLES)][0], lw=1.2, alpha=0.7, label=label, zorder=2)
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if paths:
        _legend(ax, len(paths), inside_up_to=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return _save(fig, path)


def panels(items, path, *, ylabel: str, title: str = "") -> Path:
    """Side-by-side line plots sharing the y axis; ``items`` = [(x, {series: ys}, xlabel, point_labels | None)].
    Point labels (e.g. model names) are written under the x ticks."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(items), figsize=(5 * len(items), 4.2), squeeze=False, sharey=True)
    for ax, (x, ys, xlabel, labels) in zip(axes[0], items):
        for i, (name, y) in enumerate(ys.items()):
            ax.plot(x, y, label=name, **style(i))
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" + (f"\n{lab}" if labels else "") for v, lab in zip(x, labels or x)], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    _legend(axes[0][-1], len(items[0][1]))
    fig.tight_layout()
    fig.suptitle(title, fontsize=10, y=1.02)
    return _save(fig, path)


def reliability_grid(rels: dict[str, dict[str, dict]], path, *, title: str = "") -> Path:
    """Reliability diagrams in a grid: rows = outer keys (e.g. models), columns = inner keys (e.g. perturbations).
    Each panel shows per-bin accuracy vs confidence and its ECE (``rel["ece"]`` if present)."""
    plt = _plt()
    rows, cols = list(rels), list(next(iter(rels.values())))
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(2.3 * len(cols), 2.3 * len(rows)), squeeze=False,
                             sharex=True, sharey=True)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax, rel = axes[i][j], rels[r][c]
            edges = np.asarray(rel["edges"])
            centers, widths = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
            mask = np.asarray(rel["count"]) > 0
            ax.bar(centers[mask], np.asarray(rel["accuracy"])[mask], width=widths[mask], edgecolor="k", lw=0.3,
                   alpha=0.7)
            ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
            if "ece" in rel:
                ax.text(0.04, 0.9, f"ECE {100 * rel['ece']:.1f}%", fontsize=7, transform=ax.transAxes, zorder=5,
                        bbox={"facecolor": "white", "alpha": 0.85, "lw": 0, "pad": 1})
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{r}\naccuracy", fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("confidence", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.suptitle(title, fontsize=10, y=1.01)  # above the column titles (bbox_inches="tight" keeps it)
    return _save(fig, path)
