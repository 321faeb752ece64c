"""The figures: accuracy with error bars, accuracy against forgetting over each method's lr
grid, the gradient cosine during training, and the cost per method. PNG, matplotlib (Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from .analysis import SR, Analysis, forgetting_label
from .methods import METHODS

COLORS = {
    "scratch": "#9e9e9e",
    "linear-probe": "#bcbd22",
    "stl": "#393b79",
    "mtl": "#1f77b4",
    "mtl-sampled": "#17becf",
    "control": "#2ca02c",
    "gradnorm": "#9467bd",
    "pcgrad": "#ff7f0e",
    "gradvac": "#e377c2",
    "reptile": "#8c6d31",
    "seq-reptile": "#d62728",
}
SHORT = {
    "scratch": "scratch",
    "linear-probe": "lin. probe",
    "stl": "STL",
    "mtl": "MTL (sum)",
    "mtl-sampled": "MTL (sampled)",
    "control": "control lr×η",
    "gradnorm": "GradNorm",
    "pcgrad": "PCGrad",
    "gradvac": "GradVac",
    "reptile": "Reptile",
    "seq-reptile": "Seq. Reptile",
}


def _width(method: str) -> float:
    return 2.6 if method == SR else 1.4


def accuracy_figure(a: Analysis, ref: dict[str, Any], path: Path) -> None:
    """Test and zero-shot accuracy at each method's selected lr: bars (mean), error bars (std),
    dots (seeds)."""
    methods = a.methods
    x = np.arange(len(methods))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.95 * len(methods) + 2), 4.4))
    for offset, metric, label, hatch in (
        (-0.2, "test_mean", "test (training languages)", ""),
        (0.2, "zero_shot_mean", "zero-shot (held-out languages)", "//"),
    ):
        means = [100 * (a.main(m)[metric]["mean"] or np.nan) for m in methods]
        stds = [100 * (a.main(m)[metric]["std"] or 0.0) for m in methods]
        ax.bar(
            x + offset,
            means,
            0.38,
            yerr=stds,
            capsize=3,
            label=label,
            hatch=hatch,
            color=[COLORS[m] for m in methods],
            edgecolor="black",
            linewidth=0.6,
            alpha=0.85,
        )
        for i, m in enumerate(methods):
            vals = [100 * v for v in a.at_selected(m, metric) if v is not None]
            ax.plot([x[i] + offset] * len(vals), vals, "k.", markersize=3)
    ax.axhline(
        100 * ref["majority_test"], color="black", linestyle=":", linewidth=1, label="majority class (test)"
    )
    ax.set_xticks(x, [SHORT[m] for m in methods], rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    finite = [
        100 * v
        for m in methods
        for v in a.at_selected(m, "test_mean") + a.at_selected(m, "zero_shot_mean")
        if v
    ]
    low = min(finite + [100 * ref["majority_test"]]) if finite else 0
    ax.set_ylim(max(0, low - 8), min(100, max(finite + [low]) + 6))
    ax.set_title(
        f"Accuracy at each method's dev-selected lr ({len(a.seeds)} seeds; bars: mean, "
        "whiskers: std, dots: seeds)",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def tradeoff_figure(a: Analysis, ref: dict[str, Any], path: Path) -> None:
    """Accuracy against forgetting (the encoder's ``forgetting`` measure), one line per method
    through its lr grid
    (larger marker = larger lr; ringed = selected), error bars = std over seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    methods = [m for m in a.methods if m != "scratch"]
    for ax, metric, title in (
        (axes[0], "test_mean", "test accuracy (training languages)"),
        (axes[1], "zero_shot_mean", "zero-shot accuracy (held-out languages)"),
    ):
        for m in methods:
            xs, ys, xe, ye, sizes = [], [], [], [], []
            for i, lr in enumerate(a.lrs):
                c = a.grid[m][lr]
                if c["forgetting"]["mean"] is None or c[metric]["mean"] is None:
                    continue
                xs.append(c["forgetting"]["mean"])
                ys.append(100 * c[metric]["mean"])
                xe.append(c["forgetting"]["std"])
                ye.append(100 * c[metric]["std"])
                sizes.append(4 + 3 * i)
                if lr == a.selected[m]:
                    ax.plot(
                        xs[-1],
                        ys[-1],
                        "o",
                        markersize=sizes[-1] + 6,
                        markerfacecolor="none",
                        markeredgecolor=COLORS[m],
                        markeredgewidth=1.5,
                    )
            if not xs:
                continue
            ax.errorbar(
                xs,
                ys,
                xerr=xe,
                yerr=ye,
                color=COLORS[m],
                linewidth=_width(m),
                elinewidth=0.8,
                capsize=2,
                label=SHORT[m],
                zorder=3 if m == SR else 2,
            )
            ax.scatter(
                xs, ys, s=[s * s for s in sizes], color=COLORS[m], zorder=4, edgecolor="black", linewidth=0.4
            )
        ax.set_xscale("log")
        ax.axvline(ref["forgetting_pretrained"], color="black", linestyle=":", linewidth=1)
        ax.text(ref["forgetting_pretrained"], ax.get_ylim()[0], " pre-trained", fontsize=8, va="bottom")
        _log_ticks(ax)
        ax.set_xlabel(f"forgetting: {forgetting_label(a.cfg)}, log scale (lower = less forgetting)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, loc="best")
    lrs = ", ".join(f"{x:.0e}" for x in a.lrs)
    fig.suptitle(
        f"Accuracy against forgetting over the lr grid ({lrs}; larger marker = larger lr, "
        "ring = dev-selected)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def _log_ticks(ax: plt.Axes) -> None:
    """Readable plain-number ticks on a log x axis that spans less than a decade."""
    lo, hi = ax.get_xlim()
    ticks = sorted({float(f"{x:.2g}") for x in np.geomspace(lo, hi, 7)})
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
    ax.set_xlim(lo, hi)


def cosine_figure(a: Analysis, path: Path) -> None:
    """Mean inter-task gradient cosine during training (selected lr): against training examples
    seen (mean ± std over seeds), and against the training loss (one line per seed)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for m in a.methods:
        if m == "stl":
            continue
        lr = a.selected[m]
        curves = [r["curve"] for r in (a.run(m, lr, s) for s in a.seeds) if r and r.get("curve")]
        if not curves:
            continue
        steps = sorted({c["examples"] for cur in curves for c in cur})
        rows = []
        for cur in curves:
            xs = [c["examples"] for c in cur]
            ys = [c["cosine"] for c in cur]
            rows.append(np.interp(steps, xs, ys))  # slow weights hold between outer steps
        mean, std = np.mean(rows, 0), np.std(rows, 0, ddof=1) if len(rows) > 1 else np.zeros(len(steps))
        axes[0].plot(
            steps,
            mean,
            "-o",
            color=COLORS[m],
            linewidth=_width(m),
            markersize=3,
            label=f"{SHORT[m]} ({lr:.0e})",
        )
        axes[0].fill_between(steps, mean - std, mean + std, color=COLORS[m], alpha=0.12)
        for k, cur in enumerate(curves):
            pts = sorted((c["train_loss"], c["cosine"]) for c in cur if c["step"] > 0)
            axes[1].plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                "-o",
                color=COLORS[m],
                linewidth=_width(m) * 0.7,
                markersize=3,
                alpha=0.9 if m == SR else 0.55,
                label=SHORT[m] if k == 0 else None,
            )
    axes[0].set_xlabel("training examples seen")
    axes[0].set_ylabel("mean inter-task gradient cosine")
    axes[0].set_title("during training (step 0 = initialisation, the same for all)", fontsize=10)
    axes[1].set_xlabel("training loss (all training names, dropout off)")
    axes[1].set_ylabel("mean inter-task gradient cosine")
    axes[1].set_title("at matched training loss (one line per seed)", fontsize=10)
    axes[1].invert_xaxis()
    for ax in axes:
        ax.axhline(0, color="black", linewidth=0.6)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle(
        "Gradient alignment (claim 1), each method at its dev-selected lr; Reptile family at slow weights",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def cost_figure(a: Analysis, path: Path) -> None:
    """Cost per method, per update and per training example. Top row, counted (what the cost
    verdict uses): backward passes per update, per 1,000 examples, and peak memory. Bottom row,
    timed (load-dependent, used by no verdict): ms per update, ms per example, and the CPU the
    rest of the machine used during the timed sections."""
    methods = a.methods
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.6))
    panels = (
        (axes[0][0], "backward_per_update", "backward passes per update", False),
        (axes[0][1], "backward_per_1k_examples", "backward passes per 1,000 examples", False),
        (axes[0][2], "peak_mb", "peak memory added by a run (MB)", False),
        (axes[1][0], "ms_per_step", "ms per update (log scale)", True),
        (axes[1][1], "ms_per_example", "ms per training example", False),
        (axes[1][2], "other_cpu_cores", "other processes' CPU while timed (cores)", False),
    )
    for ax, metric, label, log in panels:
        vals = [a.main(m)[metric]["mean"] for m in methods]
        errs = [a.main(m)[metric]["std"] or 0.0 for m in methods]
        heights = [np.nan if v is None else v for v in vals]
        ax.bar(
            range(len(methods)),
            heights,
            yerr=errs,
            capsize=2,
            color=[COLORS[m] for m in methods],
            edgecolor="black",
            linewidth=0.5,
        )
        if metric == "backward_per_update":  # hatch the partial passes (GradNorm)
            full = [a.main(m)["full_backward_per_update"]["mean"] for m in methods]
            partial = [np.nan if v is None or f is None else v - f for v, f in zip(vals, full)]
            ax.bar(
                range(len(methods)),
                partial,
                bottom=[np.nan if f is None else f for f in full],
                color="none",
                edgecolor="black",
                hatch="//",
                linewidth=0.5,
                label="partial passes",
            )
            if any(p and p > 0 for p in partial if not np.isnan(p)):
                ax.legend(fontsize=7)
        ax.set_xticks(range(len(methods)), [SHORT[m] for m in methods], rotation=40, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        if log:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].text(
        -0.18,
        1.12,
        "counted: what the cost verdict uses",
        transform=axes[0][0].transAxes,
        fontsize=10,
        fontweight="bold",
    )
    axes[1][0].text(
        -0.18,
        1.12,
        "timed: load-dependent, not used by any verdict",
        transform=axes[1][0].transAxes,
        fontsize=10,
        fontweight="bold",
    )
    fig.suptitle("Cost at equal training examples (claim 4)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def all_figures(a: Analysis, ref: dict[str, Any], out_dir: Path, suite: str) -> dict[str, str]:
    """Write every figure; return {key: file name} (relative to ``out_dir``)."""
    names = {
        "accuracy": f"{suite}_accuracy.png",
        "tradeoff": f"{suite}_tradeoff.png",
        "cosine": f"{suite}_cosine.png",
        "cost": f"{suite}_cost.png",
    }
    accuracy_figure(a, ref, out_dir / names["accuracy"])
    tradeoff_figure(a, ref, out_dir / names["tradeoff"])
    cosine_figure(a, out_dir / names["cosine"])
    cost_figure(a, out_dir / names["cost"])
    return names


__all__ = ["all_figures", "METHODS"]
