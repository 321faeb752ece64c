"""Statistics over the runs: summaries, lr selection, paired differences, comparisons at matched
forgetting and at matched training loss, and the verdict on each of the paper's four claims.

Conventions (stated in the report too):

* mean ± std over seeds, std with ``ddof=1`` (the sample standard deviation);
* each method's lr is selected on mean **dev** accuracy (entity-disjoint from train and test);
  test and zero-shot numbers are then read at that lr. The control is the exception: it is
  defined by Sequential Reptile's lr (sampled MTL at that lr times η), so it is read at
  Sequential Reptile's selected lr; sampled MTL at its own best lr is the ``mtl-sampled`` row;
* paired differences are per seed: at one seed every method sees the same suite, head
  initialisation and per-language batch order;
* a difference "holds" when it has the same sign on every seed where both sides are measured,
  and there are at least 2 such seeds (the count is reported next to it).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from .config import MEASURES, Config

Record = dict[str, Any]

SR = "seq-reptile"
CONTROL = "control"
SAMPLED = "mtl-sampled"
BASELINES = ("mtl", "mtl-sampled", "control", "gradnorm", "pcgrad", "gradvac", "reptile", "stl")
"""Methods Sequential Reptile is claimed to beat (those present in a run)."""
COUNTED = (
    "backward_per_update",
    "full_backward_per_update",
    "examples_per_update",
    "backward_per_1k_examples",
    "full_backward_per_1k_examples",
    "peak_mb",
)
"""The cost measures the cost verdict reads: counted in the training loop from what ran (and the
peak memory), so the machine's load cannot change them."""
COMPARED = ("test_mean", "zero_shot_mean", "forgetting", "lid_loss", "drift", "cosine_mean")
"""The measures paired by seed between two methods (:meth:`Analysis.versus`,
:meth:`Analysis.sr_vs_control`)."""
TIMED = ("ms_per_example", "ms_per_step", "load_1min_mean", "other_cpu_cores")
"""Timings and the load measured alongside them: reported, never used by a verdict."""
METRICS = (
    (
        "test_mean",
        "zero_shot_mean",
        "dev_mean",
        "forgetting",
        "retrieval",
        "retrieval_error",
        "lid_loss",
        "lid_acc",
        "drift",
        "cosine_final",
        "cosine_mean",
        "train_loss_final",
    )
    + COUNTED
    + TIMED
)
SURGERY = ("pcgrad", "gradvac")
"""The methods claim 4 is about: T backward passes per update and a T × P Jacobian."""
LOSS_LEVELS = 5


def summary(values: Iterable[float | None]) -> dict[str, Any]:
    """mean, sample std, n and the values (``None``/NaN dropped)."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return {"mean": None, "std": None, "n": 0, "values": []}
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return {"mean": float(np.mean(vals)), "std": std, "n": len(vals), "values": vals}


def paired(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    """Summary of per-seed differences ``a - b`` and whether their sign is the same on every
    seed (``holds``: +1 all positive, -1 all negative, 0 mixed or missing)."""
    diffs = [
        x - y
        for x, y in zip(a, b)
        if x is not None and y is not None and not math.isnan(x) and not math.isnan(y)
    ]
    out = summary(diffs)
    enough = len(diffs) >= 2  # one seed shows no consistency
    out["holds"] = (
        (1 if all(d > 0 for d in diffs) else -1 if all(d < 0 for d in diffs) else 0) if enough else 0
    )
    return out


def derived(record: Record) -> dict[str, Any]:
    """Per-run metrics computed from the record: final/mean cosine, final training loss."""
    curve = [c for c in record.get("curve", []) if c["step"] > 0]
    return {
        "cosine_final": curve[-1]["cosine"] if curve else None,
        "cosine_mean": float(np.mean([c["cosine"] for c in curve])) if curve else None,
        "train_loss_final": curve[-1]["train_loss"] if curve else None,
    }


class Analysis:
    """All statistics of one benchmark run (``to_dict`` for the JSON file)."""

    def __init__(self, cfg: Config, records: list[Record]) -> None:
        self.cfg = cfg
        self.records = records
        self.methods = [m for m in cfg.methods if any(r["method"] == m for r in records)]
        self.seeds = list(cfg.seeds)
        self.lrs = list(cfg.lrs)
        self._by = {(r["method"], r["lr"], r["seed"]): {**r, **derived(r)} for r in records}
        self.grid = {m: {lr: self._cell(m, lr) for lr in self.lrs} for m in self.methods}
        self.selected = {m: self._select(m) for m in self.methods}
        if CONTROL in self.selected and SR in self.selected:
            self.selected[CONTROL] = self.selected[SR]

    # ------------------------------------------------------------------ basic access
    def run(self, method: str, lr: float, seed: int) -> Record | None:
        return self._by.get((method, lr, seed))

    def values(self, method: str, lr: float, metric: str) -> list[float | None]:
        """``metric`` of every seed (``None`` where missing), in seed order."""
        return [(self.run(method, lr, s) or {}).get(metric) for s in self.seeds]

    def _cell(self, method: str, lr: float) -> dict[str, Any]:
        return {metric: summary(self.values(method, lr, metric)) for metric in METRICS}

    def _select(self, method: str) -> float:
        """The grid lr with the best mean dev accuracy (ties: the smaller lr)."""

        def score(lr: float) -> float:
            mean = self.grid[method][lr]["dev_mean"]["mean"]
            return -math.inf if mean is None else mean

        return max(self.lrs, key=lambda lr: (score(lr), -lr))

    def at_selected(self, method: str, metric: str) -> list[float | None]:
        return self.values(method, self.selected[method], metric)

    def main(self, method: str) -> dict[str, Any]:
        """Summaries at the method's selected lr."""
        return self.grid[method][self.selected[method]]

    # ------------------------------------------------------------------ comparisons
    def pretraining_gap(self) -> dict[str, Any] | None:
        """Pre-trained sampled MTL minus scratch (same optimizer), each at its selected lr."""
        if SAMPLED not in self.methods or "scratch" not in self.methods:
            return None
        return {
            m: paired(self.at_selected(SAMPLED, m), self.at_selected("scratch", m))
            for m in ("test_mean", "zero_shot_mean")
        }

    def versus(self, reference: str = SR) -> dict[str, dict[str, Any]]:
        """``reference`` minus every other method, each at its selected lr, paired by seed."""
        if reference not in self.methods:
            return {}
        out = {}
        for m in self.methods:
            if m == reference:
                continue
            out[m] = {
                metric: paired(self.at_selected(reference, metric), self.at_selected(m, metric))
                for metric in COMPARED
            }
        return out

    def sr_vs_control(self) -> dict[float, dict[str, Any]]:
        """Sequential Reptile at inner lr α minus the control (sampled MTL at α·η), per grid
        value α: equal distance from the pre-trained weights, so differences in forgetting and
        accuracy are not explained by smaller steps."""
        if SR not in self.methods or CONTROL not in self.methods:
            return {}
        return {
            lr: {
                metric: paired(self.values(SR, lr, metric), self.values(CONTROL, lr, metric))
                for metric in (*COMPARED, "train_loss_final")
            }
            for lr in self.lrs
        }

    def _lr_path(self, method: str, seed: int, metric: str) -> list[tuple[float, float]]:
        """(forgetting, metric) of the method's runs in order of the lr they ran at; sampled MTL
        (and the control, the same algorithm) take the runs of both, so the path spans
        lr·η to lr."""
        members = [method]
        if method in (SAMPLED, CONTROL):
            members = [m for m in (SAMPLED, CONTROL) if m in self.methods]
        by_lr: dict[float, tuple[float, float]] = {}
        for m in members:
            for lr in self.lrs:
                r = self.run(m, lr, seed)
                if r and r.get("forgetting") is not None and r.get(metric) is not None:
                    by_lr[round(r["effective_lr"], 12)] = (r["forgetting"], r[metric])
        return [by_lr[k] for k in sorted(by_lr)]

    def matched_forgetting(self) -> dict[str, dict[str, Any]]:
        """Accuracy at equal forgetting, both ways, per seed: the best accuracy a method reaches
        where its lr path (straight lines between neighbouring grid lrs in the (forgetting,
        accuracy) plane) crosses the level; never extrapolated.

        * ``at_sr_level``: the method's accuracy at the forgetting of Sequential Reptile's
          selected run, and Sequential Reptile minus it;
        * ``sr_at_level``: Sequential Reptile's accuracy at the forgetting of the method's
          selected run, minus the method's.
        """
        if SR not in self.methods:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for m in self.methods:
            if m in (SR, "scratch"):
                continue
            res: dict[str, Any] = {}
            for metric in ("test_mean", "zero_shot_mean"):
                fwd_sr, fwd_other, rev_sr, rev_other = [], [], [], []
                for seed in self.seeds:
                    a = self.run(SR, self.selected[SR], seed) or {}
                    b = self.run(m, self.selected[m], seed) or {}
                    fwd_sr.append(a.get(metric) if a.get("forgetting") is not None else None)
                    fwd_other.append(
                        None
                        if a.get("forgetting") is None
                        else _on_path(self._lr_path(m, seed, metric), a["forgetting"])
                    )
                    rev_other.append(b.get(metric) if b.get("forgetting") is not None else None)
                    rev_sr.append(
                        None
                        if b.get("forgetting") is None
                        else _on_path(self._lr_path(SR, seed, metric), b["forgetting"])
                    )
                res[metric] = {
                    "at_sr_level": {"method": summary(fwd_other), **paired(fwd_sr, fwd_other)},
                    "sr_at_level": {"sr": summary(rev_sr), **paired(rev_sr, rev_other)},
                }
            out[m] = res
        return out

    def matched_loss_cosine(self) -> dict[str, Any]:
        """Inter-task gradient cosine at equal training loss: per seed, each method's curve of
        (training loss, cosine) over its measurement points after initialisation (selected
        lr), compared with Sequential Reptile's on the loss range both cover (mean over
        ``LOSS_LEVELS`` evenly spaced levels). ``None`` where the ranges do not overlap."""
        if SR not in self.methods:
            return {}
        out = {}
        for m in self.methods:
            if m in (SR, "stl"):
                continue
            diffs, sr_at, other_at = [], [], []
            for seed in self.seeds:
                a = _loss_curve(self.run(SR, self.selected[SR], seed))
                b = _loss_curve(self.run(m, self.selected[m], seed))
                levels = _common_levels(a, b)
                if not levels:
                    diffs.append(None), sr_at.append(None), other_at.append(None)
                    continue
                ca = [_interp(a, x) for x in levels]
                cb = [_interp(b, x) for x in levels]
                sr_at.append(float(np.mean(ca)))
                other_at.append(float(np.mean(cb)))
                diffs.append(sr_at[-1] - other_at[-1])
            out[m] = {"sr": summary(sr_at), "other": summary(other_at), **paired(sr_at, other_at)}
        return out

    # ------------------------------------------------------------------ verdicts
    def claims(self) -> dict[str, dict[str, Any]]:
        """The verdict on each claim, with the rule applied and the numbers behind it."""
        return {
            "alignment": self._claim_alignment(),
            "forgetting": self._claim_forgetting(),
            "accuracy": self._claim_accuracy(),
            "cost": self._claim_cost(),
        }

    def _baselines(self) -> list[str]:
        return [m for m in BASELINES if m in self.methods and m != SR]

    def _claim_alignment(self) -> dict[str, Any]:
        rule = (
            "Sequential Reptile's gradient cosine at matched training loss is higher than "
            "the baseline's on every seed"
        )
        matched = self.matched_loss_cosine()
        per = {m: matched[m]["holds"] for m in self._baselines() if m in matched}
        return _verdict(rule, per, {m: matched[m] for m in per})

    def _claim_forgetting(self) -> dict[str, Any]:
        rule = (
            f"Sequential Reptile (selected lr) has a lower {forgetting_label(self.cfg)} than "
            "the baseline (selected lr) on every seed"
        )
        vs = self.versus()
        per = {m: -vs[m]["forgetting"]["holds"] for m in self._baselines() if m in vs}
        out = _verdict(rule, per, {m: vs[m]["forgetting"] for m in per})
        ctrl = self.sr_vs_control()
        out["sr_minus_control_forgetting_per_lr"] = {repr(lr): v["forgetting"] for lr, v in ctrl.items()}
        return out

    def _claim_accuracy(self) -> dict[str, Any]:
        rule = (
            "Sequential Reptile (selected lr) beats the baseline (selected lr) on mean test "
            "accuracy and on zero-shot accuracy, on every seed"
        )
        vs = self.versus()
        per = {m: _both(vs[m]["test_mean"], vs[m]["zero_shot_mean"]) for m in self._baselines() if m in vs}
        out = _verdict(rule, per, {m: {k: vs[m][k] for k in ("test_mean", "zero_shot_mean")} for m in per})
        matched = self.matched_forgetting()
        at_level = {
            m: _both(matched[m]["test_mean"]["at_sr_level"], matched[m]["zero_shot_mean"]["at_sr_level"])
            for m in self._baselines()
            if m in matched
        }
        second = _verdict(
            f"at Sequential Reptile's {forgetting_label(self.cfg)}, Sequential Reptile beats the "
            "baseline's best accuracy at that forgetting on test and zero-shot, on "
            "every seed where the baseline's lr path reaches it",
            at_level,
            {m: matched[m] for m in at_level},
            {m: matched[m]["test_mean"]["at_sr_level"]["n"] for m in at_level},
        )
        out["at_matched_forgetting"] = second
        return out

    def cost_versus(self, reference: str = SR) -> dict[str, dict[str, Any]]:
        """``reference`` against every other method on each counted cost measure
        (:data:`COUNTED`), each at its selected lr, seed by seed: the two summaries and the
        relation (:func:`_relation`: ``lower`` when ``reference`` is lower on every seed)."""
        if reference not in self.methods:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for m in self.methods:
            if m == reference:
                continue
            out[m] = {}
            for metric in COUNTED:
                a, b = self.at_selected(reference, metric), self.at_selected(m, metric)
                out[m][metric] = {"sr": summary(a), "other": summary(b), **_relation(a, b)}
        return out

    def timings(self, reference: str = SR) -> dict[str, dict[str, Any]]:
        """Time per training example and per update of every method (selected lr), as a ratio to
        ``reference``'s too, with the load measured during the same timed sections.
        Load-dependent: no verdict reads these."""
        ref = self.main(reference) if reference in self.methods else None
        out = {}
        for m in self.methods:
            cell = self.main(m)
            row: dict[str, Any] = {k: cell[k] for k in TIMED}
            for k in ("ms_per_example", "ms_per_step"):
                mine, theirs = cell[k]["mean"], ref[k]["mean"] if ref else None
                row[f"{k}_ratio_to_sr"] = mine / theirs if mine is not None and theirs else None
            out[m] = row
        return out

    def _claim_cost(self) -> dict[str, Any]:
        rule = (
            "counted in the training loop, never timed: (a) per update, Sequential Reptile "
            "runs fewer backward passes than PCGrad and GradVac; (b) per training example "
            "(backward passes ÷ examples fed, both counted), no more than sampled MTL; (c) its "
            "peak memory is below PCGrad's and GradVac's; each on every seed measured. "
            "Timings are reported apart and not used"
        )
        if SR not in self.methods:
            return {"rule": rule, "verdict": "not measured"}
        vs = self.cost_versus()
        checks = {
            "fewer_backward_per_update": ("backward_per_update", SURGERY, ("lower",)),
            "backward_per_example_at_most_sampled": (
                "backward_per_1k_examples",
                (SAMPLED,),
                ("lower", "equal"),
            ),
            "lower_peak_memory": ("peak_mb", SURGERY, ("lower",)),
        }
        results: dict[str, Any] = {}
        for name, (metric, against, ok) in checks.items():
            per = {m: vs[m][metric] for m in against if m in vs and vs[m][metric]["n"] > 0}
            results[name] = {
                "metric": metric,
                "per_baseline": per,
                "holds": bool(per) and all(v["relation"] in ok for v in per.values()),
            }
        missing = [name for name, c in results.items() if not c["per_baseline"]]
        passed = [c for c in results.values() if c["holds"]]
        if len(missing) == len(checks):
            verdict = "not measured"
        elif missing:  # a check that did not run is neither a pass nor a failure
            verdict = f"undetermined (not measured: {', '.join(missing)})"
        else:
            verdict = "yes" if len(passed) == len(checks) else "partly" if passed else "no"
        return {
            "rule": rule,
            "verdict": verdict,
            "checks": results,
            "sr_not_cheaper": self._sr_not_cheaper(vs),
            "numbers": {m: {k: self.main(m)[k]["mean"] for k in COUNTED} for m in self.methods},
        }

    @staticmethod
    def _sr_not_cheaper(vs: dict[str, dict[str, Any]]) -> dict[str, list[str]]:
        """Where Sequential Reptile does not win on a counted measure: per measure, the methods
        that are lower than it on every seed (``cheaper``); for backward passes per example,
        also those equal to it (``equal``: per example, it saves nothing against them)."""
        out: dict[str, list[str]] = {}
        for metric in (
            "backward_per_update",
            "backward_per_1k_examples",
            "full_backward_per_1k_examples",
            "peak_mb",
        ):
            out[f"cheaper:{metric}"] = [m for m, v in vs.items() if v[metric]["relation"] == "higher"]
        out["equal:backward_per_1k_examples"] = [
            m for m, v in vs.items() if v["backward_per_1k_examples"]["relation"] == "equal"
        ]
        return out

    def edge_warnings(self) -> list[str]:
        """One line per method whose selected lr is the lowest or the highest of a grid of two
        or more (the best lr may lie outside it: widen the grid). The control is left out: it
        takes Sequential Reptile's lr."""
        if len(self.lrs) < 2:
            return []
        out = []
        for m, lr in self.selected.items():
            if m != CONTROL and lr in (min(self.lrs), max(self.lrs)):
                end = "lowest" if lr == min(self.lrs) else "highest"
                out.append(
                    f"{m}: the selected lr {lr:g} is the {end} of the grid; its best lr may lie "
                    f"outside it (widen the grid with --lrs)"
                )
        return out

    # ------------------------------------------------------------------ export
    def to_dict(self) -> dict[str, Any]:
        return {
            "selected_lr": self.selected,
            "lr_at_grid_edge": self.edge_warnings(),
            "grid": {m: {repr(lr): cell for lr, cell in cells.items()} for m, cells in self.grid.items()},
            "pretraining_gap": self.pretraining_gap(),
            "versus_seq_reptile": self.versus(),
            "seq_reptile_vs_control": {repr(lr): v for lr, v in self.sr_vs_control().items()},
            "matched_forgetting": self.matched_forgetting(),
            "matched_loss_cosine": self.matched_loss_cosine(),
            "cost_versus_seq_reptile": self.cost_versus(),
            "timings_load_dependent": self.timings(),
            "claims": self.claims(),
        }


# ---------------------------------------------------------------------- helpers
def _interp(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """Linear interpolation of sorted (x, y) points at ``x``; ``None`` outside their range."""
    if not points:
        return None
    xs = np.array([p[0] for p in points])
    ys = np.array([p[1] for p in points])
    order = np.argsort(xs)
    xs, ys = xs[order], ys[order]
    if x < xs[0] - 1e-12 or x > xs[-1] + 1e-12:
        return None
    return float(np.interp(x, xs, ys))


def _on_path(path: Sequence[tuple[float, float]], level: float) -> float | None:
    """The best y where the polyline through ``path`` (x = forgetting) crosses x = ``level``;
    ``None`` if it never does."""
    best: float | None = None
    for (x0, y0), (x1, y1) in zip(path, path[1:]):
        lo, hi = min(x0, x1), max(x0, x1)
        if not lo - 1e-12 <= level <= hi + 1e-12:
            continue
        y = y0 if hi == lo else y0 + (y1 - y0) * (level - x0) / (x1 - x0)
        best = y if best is None else max(best, y)
    if len(path) == 1 and abs(path[0][0] - level) <= 1e-12:
        best = path[0][1]
    return best


def _both(a: dict[str, Any], b: dict[str, Any]) -> int:
    """+1 if both paired differences hold positive, -1 if both negative, else 0."""
    if a["holds"] == 1 and b["holds"] == 1:
        return 1
    if a["holds"] == -1 and b["holds"] == -1:
        return -1
    return 0


def _loss_curve(record: Record | None) -> list[tuple[float, float]]:
    if record is None:
        return []
    return sorted((c["train_loss"], c["cosine"]) for c in record.get("curve", []) if c["step"] > 0)


def _common_levels(a: Sequence[tuple[float, float]], b: Sequence[tuple[float, float]]) -> list[float]:
    if not a or not b:
        return []
    lo = max(a[0][0], b[0][0])
    hi = min(a[-1][0], b[-1][0])
    if hi < lo:
        return []
    if hi == lo:
        return [lo]
    return [float(x) for x in np.linspace(lo, hi, LOSS_LEVELS)]


def forgetting_label(cfg: Config) -> str:
    """What the ``forgetting`` field measures on the run's encoder, in prose."""
    return MEASURES[cfg.forgetting][0]


def _relation(a: Sequence[float | None], b: Sequence[float | None]) -> dict[str, Any]:
    """How ``a`` compares with ``b`` seed by seed (seeds where either is missing are skipped):
    ``lower``, ``higher`` or ``equal`` (to 1e-9 relative) on every compared seed, else
    ``mixed``; ``None`` with ``n`` = 0 when no seed has both."""
    signs = set()
    n = 0
    for x, y in zip(a, b):
        if x is None or y is None or math.isnan(x) or math.isnan(y):
            continue
        n += 1
        signs.add(0 if math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12) else 1 if x > y else -1)
    relation = (
        None if not n else "mixed" if len(signs) > 1 else {-1: "lower", 0: "equal", 1: "higher"}[signs.pop()]
    )
    return {"relation": relation, "n": n}


def _verdict(
    rule: str, per: dict[str, int], numbers: dict[str, Any], counts: dict[str, int] | None = None
) -> dict[str, Any]:
    """yes / partly / no over the baselines compared on 2 or more seeds (``counts``: seeds
    compared per baseline, default: read from ``numbers``); the others are listed as not
    comparable rather than counted as failures."""
    if counts is None:
        counts = {m: max((s.get("n", 0) for s in _flat_summaries(numbers.get(m))), default=0) for m in per}
    comparable = {m: h for m, h in per.items() if counts.get(m, 0) >= 2}
    wins = [m for m, h in comparable.items() if h == 1]
    if not per:
        verdict = "not measured"
    elif not comparable:
        verdict = "undetermined (needs 2 or more seeds)"
    elif len(wins) == len(comparable):
        verdict = "yes"
    elif wins:
        verdict = "partly"
    else:
        verdict = "no"
    return {
        "rule": rule,
        "verdict": verdict,
        "holds_against": wins,
        "fails_against": [m for m, h in comparable.items() if h != 1],
        "not_comparable": [m for m in per if m not in comparable],
        "per_baseline": numbers,
    }


def _flat_summaries(tree: Any) -> list[dict[str, Any]]:
    """Every summary (a dict with "n") nested in ``tree``."""
    if isinstance(tree, dict):
        if "n" in tree and "mean" in tree:
            return [tree]
        return [s for v in tree.values() for s in _flat_summaries(v)]
    return []
