"""Figures (matplotlib, Agg backend): each function writes one PNG and returns its path."""

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
    fig.savefig(path, dpi=120)
    _plt().close(fig)
    return path


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
        ax.axvline(x, color="k", ls="--", lw=1, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def lines(x, ys: dict[str, np.ndarray], path, *, xlabel: str, ylabel: str, title: str = "",
          yerr: dict[str, np.ndarray] | None = None, logx: bool = False) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, y in ys.items():
        if yerr and name in yerr:
            ax.errorbar(x, y, yerr=yerr[name], marker="o", capsize=3, label=name)
        else:
            ax.plot(x, y, marker="o", label=name)
    if logx:
        ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray, float]], path, *, title: str = "") -> Path:
    """ROC curves: {name: (fpr, tpr, auroc)}."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, label=f"{name} (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1, label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate (detection rate)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="lower right")
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
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def scatter(points: dict[str, tuple[float, float]], path, *, xlabel: str, ylabel: str, title: str = "",
            paths: dict[str, list[str]] | None = None) -> Path:
    """Labelled points {name: (x, y)}, e.g. one model per point on a robustness trade-off plane; ``paths``
    {label: [names]} joins named points in order with a labelled line (e.g. a series of training strengths)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for label, names in (paths or {}).items():
        pts = np.array([points[n] for n in names if n in points])
        ax.plot(pts[:, 0], pts[:, 1], ls="--", lw=1, alpha=0.6, label=label)
    for name, (x, y) in points.items():
        ax.scatter([x], [y], s=40, zorder=3)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    if paths:
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.margins(0.15)
    return _save(fig, path)


def panels(items, path, *, ylabel: str, title: str = "") -> Path:
    """Side-by-side line plots sharing the y axis; ``items`` = [(x, {series: ys}, xlabel, point_labels | None)].
    Point labels (e.g. model names) are written under the x ticks."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(items), figsize=(5 * len(items), 4.2), squeeze=False, sharey=True)
    for ax, (x, ys, xlabel, labels) in zip(axes[0], items):
        for name, y in ys.items():
            ax.plot(x, y, marker="o", label=name)
        ax.set_xticks(x)
        ax.set_xticklabels([f"{v:g}" + (f"\n{lab}" if labels else "") for v, lab in zip(x, labels or x)], fontsize=8)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title)
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
                ax.text(0.04, 0.9, f"ECE {100 * rel['ece']:.1f}%", fontsize=7, transform=ax.transAxes)
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{r}\naccuracy", fontsize=8)
            if i == len(rows) - 1:
                ax.set_xlabel("confidence", fontsize=8)
            ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
