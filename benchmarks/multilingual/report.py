"""The results files: ``<suite>.json`` (every number, with config, versions and machine) and
``<suite>.md`` (the tables a person reads, with the figures embedded)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .analysis import SR, Analysis, forgetting_label
from .config import MEASURES
from .evaluate import final_metrics
from .methods import METHODS, describe

Summary = dict[str, Any]


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=1, default=_jsonable) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)


# ---------------------------------------------------------------------- number formatting
def _num(x: float | None, digits: int, scale: float = 1.0, sign: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x * scale:{'+' if sign else ''}.{digits}f}"


def ms(s: Summary, digits: int = 3, scale: float = 1.0, sign: bool = False) -> str:
    """``mean ± std`` of a summary."""
    if s is None or s.get("mean") is None:
        return "n/a"
    text = _num(s["mean"], digits, scale, sign)
    if s.get("n", 0) > 1:
        text += f" ± {_num(s['std'], digits, scale)}"
    return text


def diff(s: Summary, digits: int = 3, scale: float = 1.0) -> str:
    """A paired difference with its consistency mark: ✓ same sign on every seed."""
    if s is None or s.get("mean") is None:
        return "n/a"
    mark = " ✓" if s.get("holds") else ""
    return ms(s, digits, scale, sign=True) + mark


def count(s: Summary, digits: int = 1) -> str:
    """A counted quantity: its mean, with ``± std`` only where it differs between seeds; whole
    numbers without decimals."""
    if s is None or s.get("mean") is None:
        return "n/a"
    mean = s["mean"]
    text = f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.{digits}f}"
    if s.get("n", 0) > 1 and s.get("std", 0) > 1e-9 * max(abs(mean), 1.0):  # not float noise
        text += f" ± {s['std']:.{digits}f}"
    return text


def _lr(x: float) -> str:
    return f"{x:.0e}".replace("e-0", "e-")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


# ---------------------------------------------------------------------- sections
def _main_table(a: Analysis, ref: dict[str, Any]) -> list[str]:
    header = [
        "method",
        "lr (dev-selected)",
        "test acc %",
        "zero-shot acc %",
        f"{short_forgetting(a.cfg)} ↓",
        f"{MEASURES[a.cfg.other_forgetting][1]} ↓",
        "drift ↓",
        "grad cosine",
        "backward passes / update",
        "backward passes / 1k examples",
        "peak MB",
    ]
    rows = []
    for m in a.methods:
        c = a.main(m)
        lr = a.selected[m]
        eff = METHODS[m].effective_lr(lr, a.cfg)
        lr_text = _lr(lr) + (f" (runs at {_lr(eff)})" if eff != lr else "")
        if m == "control" and SR in a.methods:
            lr_text += ", SR's lr"
        rows.append(
            [
                METHODS[m].label,
                lr_text,
                ms(c["test_mean"], 1, 100),
                ms(c["zero_shot_mean"], 1, 100),
                ms(c["forgetting"], 3),
                ms(c[a.cfg.other_forgetting], 3),
                ms(c["drift"], 3),
                ms(c["cosine_mean"], 2),
                count(c["backward_per_update"]),
                count(c["backward_per_1k_examples"]),
                ms(c["peak_mb"], 1),
            ]
        )
    rows.append(
        [
            "pre-trained encoder, before fine-tuning",
            "",
            "",
            "",
            _num(ref["forgetting_pretrained"], 3),
            _num(ref.get(f"{a.cfg.other_forgetting}_pretrained", math.nan), 3),
            "0",
            "",
            "",
            "",
            "",
        ]
    )
    rows.append(
        [
            "majority class",
            "",
            _num(ref["majority_test"], 1, 100),
            _num(ref["majority_zero_shot"], 1, 100),
            "",
            "",
            "",
            "",
            "",
            "",
        ]
    )
    return _table(header, rows)


def _claims_section(a: Analysis) -> list[str]:
    claims = a.claims()
    names = {
        "alignment": "1. aligns gradients between tasks",
        "forgetting": "2. forgets less of the pre-training",
        "accuracy": "3. beats the baselines on the tasks and zero-shot",
        "cost": "4. costs less than PCGrad and GradVac (1 backward pass per update, not T)",
    }
    rows = []
    for key, title in names.items():
        c = claims[key]
        detail = c["rule"]
        if c.get("holds_against") is not None and c["verdict"] in ("partly", "yes", "no"):
            detail += ". " + _against(c)
        if key == "cost" and "checks" in c:
            detail += ". " + _cost_detail(a, c)
        if key == "accuracy" and "at_matched_forgetting" in c:
            s = c["at_matched_forgetting"]
            detail += f". Secondary, at matched forgetting: **{s['verdict']}** ({s['rule']}. {_against(s)})"
        rows.append([title, f"**{c['verdict']}**", detail])
    return _table(["claim", "reproduced?", "rule applied (details below)"], rows)


_CHECK_TEXT = {
    "fewer_backward_per_update": ("(a)", "backward passes per update"),
    "backward_per_example_at_most_sampled": ("(b)", "backward passes per 1k examples"),
    "lower_peak_memory": ("(c)", "peak MB"),
}


def _cost_detail(a: Analysis, c: dict[str, Any]) -> str:
    """Claim 4's checks with their numbers, and where Sequential Reptile is not cheaper."""
    parts = []
    for name, check in c["checks"].items():
        tag, what = _CHECK_TEXT[name]
        per = check["per_baseline"]
        if not per:
            parts.append(f"{tag} {what}: not measured")
            continue
        sr = next(iter(per.values()))["sr"]
        fmt = (lambda x: ms(x, 1)) if check["metric"] == "peak_mb" else count
        others = ", ".join(f"{m} {fmt(v['other'])}" for m, v in per.items())
        parts.append(
            f"{tag} {what}: SR {fmt(sr)}, {others}: {'holds' if check['holds'] else 'does not hold'}"
        )
    return "; ".join(parts) + ". " + _not_cheaper_text(c["sr_not_cheaper"])


def _not_cheaper_text(nc: dict[str, list[str]]) -> str:
    """One sentence per counted measure on which some method is at least as cheap as SR."""
    names = {
        "backward_per_update": "backward passes per update",
        "backward_per_1k_examples": "backward passes per example",
        "full_backward_per_1k_examples": "full backward passes per example",
        "peak_mb": "peak memory",
    }
    out = []
    for metric, label in names.items():
        cheaper, equal = nc.get(f"cheaper:{metric}", []), nc.get(f"equal:{metric}", [])
        bits = []
        if cheaper:
            bits.append(f"lower for {', '.join(cheaper)}")
        if equal:
            bits.append(f"equal for {', '.join(equal)}")
        if bits:
            out.append(f"{label}: {'; '.join(bits)}")
    if not out:
        return "Sequential Reptile is the cheapest on every counted measure."
    return "Where Sequential Reptile is not cheaper (every seed): " + "; ".join(out) + "."


def _cost_table(a: Analysis) -> list[str]:
    rows = []
    for m in a.methods:
        c = a.main(m)
        full, passes = c["full_backward_per_update"]["mean"], c["backward_per_update"]["mean"]
        partial = None if full is None or passes is None else passes - full
        rows.append(
            [
                METHODS[m].label,
                count(c["examples_per_update"]),
                count(c["backward_per_update"]),
                "n/a" if partial is None else f"{partial:g}",
                count(c["backward_per_1k_examples"]),
                count(c["full_backward_per_1k_examples"]),
                ms(c["peak_mb"], 1),
            ]
        )
    return _table(
        [
            "method",
            "examples / update",
            "backward passes / update",
            "of which partial",
            "backward passes / 1k examples",
            "full backward passes / 1k examples",
            "peak MB",
        ],
        rows,
    )


def _timing_table(a: Analysis) -> list[str]:
    rows = []
    for m, t in a.timings().items():
        load = t["load_1min_mean"]
        rows.append(
            [
                METHODS[m].label,
                ms(t["ms_per_example"], 3),
                _times(t["ms_per_example_ratio_to_sr"]),
                ms(t["ms_per_step"], 1),
                _times(t["ms_per_step_ratio_to_sr"]),
                ms(load, 2),
                ms(t["other_cpu_cores"], 2),
            ]
        )
    return _table(
        [
            "method",
            "ms / example",
            "× SR per example",
            "ms / step (update)",
            "× SR per step",
            "load average (1 min) in its timed sections",
            "other processes' CPU, cores",
        ],
        rows,
    )


def _times(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.2f}×"


def _against(c: dict[str, Any]) -> str:
    text = (
        f"Holds against: {', '.join(c['holds_against']) or 'none'}; "
        f"not against: {', '.join(c['fails_against']) or 'none'}"
    )
    if c.get("not_comparable"):
        text += f"; not comparable (fewer than 2 seeds overlap): {', '.join(c['not_comparable'])}"
    return text


def _versus_table(a: Analysis) -> list[str]:
    vs = a.versus()
    rows = [
        [
            METHODS[m].label,
            diff(v["test_mean"], 1, 100),
            diff(v["zero_shot_mean"], 1, 100),
            diff(v["forgetting"], 3),
            diff(v["drift"], 3),
            diff(v["cosine_mean"], 2),
        ]
        for m, v in vs.items()
    ]
    return _table(
        [
            "Sequential Reptile minus …",
            "Δ test (points)",
            "Δ zero-shot (points)",
            f"Δ {short_forgetting(a.cfg)}",
            "Δ drift",
            "Δ grad cosine",
        ],
        rows,
    )


def _control_table(a: Analysis) -> list[str]:
    rows = []
    for lr, v in a.sr_vs_control().items():
        rows.append(
            [
                f"{_lr(lr)} vs {_lr(lr * a.cfg.outer_lr)}",
                diff(v["test_mean"], 1, 100),
                diff(v["zero_shot_mean"], 1, 100),
                diff(v["forgetting"], 3),
                diff(v["drift"], 3),
                diff(v["cosine_mean"], 2),
                diff(v["train_loss_final"], 3),
            ]
        )
    return _table(
        [
            "SR inner lr vs control lr",
            "Δ test (points)",
            "Δ zero-shot (points)",
            f"Δ {short_forgetting(a.cfg)}",
            "Δ drift",
            "Δ grad cosine",
            "Δ final train loss",
        ],
        rows,
    )


def _matched_forgetting_table(a: Analysis) -> list[str]:
    rows = []
    for m, v in a.matched_forgetting().items():
        label = METHODS[m].label + (" (path through both)" if m in ("mtl-sampled", "control") else "")
        f_t, f_z = v["test_mean"]["at_sr_level"], v["zero_shot_mean"]["at_sr_level"]
        r_t, r_z = v["test_mean"]["sr_at_level"], v["zero_shot_mean"]["sr_at_level"]
        rows.append(
            [
                label,
                diff(f_t, 1, 100),
                diff(f_z, 1, 100),
                f"{f_t['n']}/{len(a.seeds)}",
                diff(r_t, 1, 100),
                diff(r_z, 1, 100),
                f"{r_t['n']}/{len(a.seeds)}",
            ]
        )
    return _table(
        [
            "method",
            "Δ test, at SR's forgetting",
            "Δ zero-shot, at SR's forgetting",
            "seeds in range",
            "Δ test, at the method's forgetting",
            "Δ zero-shot, at the method's forgetting",
            "seeds in range",
        ],
        rows,
    )


def _matched_loss_table(a: Analysis) -> list[str]:
    rows = [
        [METHODS[m].label, ms(v["sr"], 3), ms(v["other"], 3), diff(v, 3), f"{v['n']}/{len(a.seeds)}"]
        for m, v in a.matched_loss_cosine().items()
    ]
    return _table(["method", "SR cosine", "method cosine", "SR − method", "seeds with overlap"], rows)


def _grid_table(a: Analysis) -> list[str]:
    rows = []
    for m in a.methods:
        for lr in a.lrs:
            c = a.grid[m][lr]
            sel = " ←" if lr == a.selected[m] else ""
            rows.append(
                [
                    METHODS[m].label,
                    _lr(lr) + sel,
                    ms(c["dev_mean"], 1, 100),
                    ms(c["test_mean"], 1, 100),
                    ms(c["zero_shot_mean"], 1, 100),
                    ms(c["forgetting"], 3),
                    ms(c["drift"], 3),
                    ms(c["cosine_mean"], 2),
                    ms(c["train_loss_final"], 3),
                ]
            )
    return _table(
        [
            "method",
            "lr",
            "dev %",
            "test %",
            "zero-shot %",
            short_forgetting(a.cfg),
            "drift",
            "grad cosine",
            "final train loss",
        ],
        rows,
    )


def _gap_line(a: Analysis) -> list[str]:
    gap = a.pretraining_gap()
    if gap is None:
        return ["Pre-trained vs scratch: not measured (needs the `mtl-sampled` and `scratch` methods)."]
    t, z = gap["test_mean"], gap["zero_shot_mean"]
    return [
        f"**Pre-training is worth {ms(t, 1, 100, sign=True)} points of test accuracy and "
        f"{ms(z, 1, 100, sign=True)} points of zero-shot accuracy** (sampled MTL on the "
        f"pre-trained encoder at its selected lr {_lr(a.selected['mtl-sampled'])} minus the same "
        f"on a randomly initialised encoder at {_lr(a.selected['scratch'])}; paired by seed, "
        f"{'same sign on every seed' if t['holds'] and z['holds'] else 'sign not the same on every seed'})."
    ]


def _cost_section(a: Analysis, cfg: Any) -> list[str]:
    lines = [
        "## Cost",
        "",
        "**Counted** (what the cost verdict uses). In the training loop, per run: the "
        "updates (`opt.step` calls), the training examples fed to them, and every backward "
        "pass that computed a gradient for a trained parameter. A *partial* pass stops short "
        "of some trained parameters (GradNorm's per-task gradient at its one shared layer). "
        "Measurement points are not counted. Per update and per 1,000 examples are both "
        f"shown: a method that takes one batch of all {cfg.num_tasks} tasks per update "
        f"processes {cfg.num_tasks}× the examples of a sampled-task update. The machine's "
        "load cannot change these numbers; peak memory is read the same way on every "
        "machine.",
        "",
    ]
    lines += _cost_table(a) + [""]
    c = a.claims()["cost"]
    if "sr_not_cheaper" in c:
        lines += [_not_cheaper_text(c["sr_not_cheaper"]), ""]
    lines += [
        "**Timed: load-dependent, not used by any verdict.** Wall-clock time of the "
        "optimizer steps only (measurement points excluded), per training example and per "
        "update, with the load measured during the same sections: the 1-minute load "
        "average sampled at the start and end of each timed section (it includes this "
        "benchmark's own threads), and the CPU the rest of the machine used meanwhile "
        "(busy time of all CPUs in `/proc/stat`, hypervisor steal included, minus this "
        "process's own), in cores. On a busy machine these times move by several times "
        "while every number above stays the same.",
        "",
    ]
    lines += _timing_table(a) + [""]
    return lines


def markdown(a: Analysis, meta: dict[str, Any], figures: dict[str, str]) -> str:
    """The Markdown report."""
    cfg = a.cfg
    ref = meta["reference"]
    lines = [f"# Multilingual benchmark: `{cfg.suite}` suite ({cfg.mode} run)", ""]
    lines += [
        f"Generated by `{meta['command']}` on {meta['finished']} in {meta['runtime_seconds']:.0f} s "
        f"(preparation {meta['prepare_seconds']:.0f} s) on {meta['machine']['cpu']} "
        f"({meta['machine']['cpu_count']} cores, {meta['machine']['torch_threads']} torch threads, "
        f"device {meta['machine']['device']}; load average at start "
        f"{meta['load_average_start']}, at end {meta['load_average_end']}). Every number is in "
        f"`{cfg.suite}.json`.",
        "",
        f"Training languages ({cfg.num_tasks}): {' '.join(cfg.train_languages)}. Zero-shot (held "
        f"out): {' '.join(cfg.zero_shot_languages)}. {cfg.n_per_language} labelled names per "
        f"language, batch {cfg.batch_size}, **{cfg.examples:,} training examples per run for every "
        f"method** ({cfg.steps} steps of one task, or {cfg.steps_for(True)} steps of all "
        f"{cfg.num_tasks} tasks). Inner optimizer AdamW (weight decay {cfg.weight_decay}) for all; "
        f"lr grid {', '.join(_lr(x) for x in cfg.lrs)} for every method; Sequential Reptile "
        f"K = {cfg.inner_steps}, η = {cfg.outer_lr}; Reptile K = {cfg.reptile_inner_steps}, "
        f"η = {cfg.outer_lr}. Seeds: {', '.join(map(str, cfg.seeds))}; mean ± sample std over "
        f"seeds. lr selected per method on dev accuracy.",
        "",
    ]
    lines += ["## Results at each method's selected lr", ""] + _main_table(a, ref) + [""]
    lines += [
        f"Forgetting is measured by the {forgetting_label(a.cfg)} (lower is better; the "
        "pre-trained encoder's value is the reference). Retrieval error: 1 − the fraction of "
        "test-entity names whose nearest neighbour (cosine) among another language's names is "
        "their translation, over every pair of the test and zero-shot languages. LID loss: the "
        "frozen language-ID probe's loss through the fine-tuned encoder. Drift: 1 − mean "
        "cosine between fine-tuned and pre-trained sentence embeddings of the probe's windows. "
        "Grad cosine: mean inter-task gradient cosine on all trainable (shared) parameters over "
        "the measurement points after initialisation, each task's gradient from all its training "
        "names. Reptile-family models are evaluated at their slow weights. Backward passes are "
        "counted as they run, per update (one `opt.step`) and per 1,000 training examples fed "
        "(see Cost below); peak MB is the resident memory the run added at its peak. Timings are "
        "in their own table below: they depend on the machine's load.",
        "",
    ]
    lines += _gap_line(a) + [""]
    lines += ["## The paper's claims", ""] + _claims_section(a) + [""]
    for key, title in (
        ("accuracy", "Accuracy figure"),
        ("tradeoff", "Accuracy against forgetting"),
        ("cosine", "Gradient cosine during training"),
        ("cost", "Cost"),
    ):
        if key in figures:
            lines += [f"![{title}]({figures[key]})", ""]
    lines += _cost_section(a, cfg)
    lines += [
        "## Paired differences (per seed, each method at its selected lr)",
        "",
        "✓ = the difference has the same sign on every seed compared (2 or more).",
        "",
    ]
    lines += _versus_table(a) + [""]
    lines += [
        "## Sequential Reptile against its control",
        "",
        f"To first order, Sequential Reptile at inner lr α and η = {cfg.outer_lr} moves as far "
        f"from the pre-trained weights as sampled MTL at α·η (the control). The drift and "
        f"final training loss columns measure whether it does. Differences SR − control, "
        f"per seed:",
        "",
    ]
    lines += _control_table(a) + [""]
    lines += (
        [
            "## Accuracy at matched forgetting",
            "",
            f"Sequential Reptile minus the method, in points, at equal {forgetting_label(a.cfg)}, "
            "per seed. Left: at the forgetting of Sequential Reptile's selected run, the method's best "
            "accuracy where its lr path crosses that level. Right: Sequential Reptile's best "
            "accuracy at the forgetting of the method's selected run. The lr path joins the runs "
            "at neighbouring grid lrs by straight lines in the (forgetting, accuracy) plane "
            "(sampled MTL and the control share one path, lr·η to lr); never extrapolated: n/a "
            "where a path does not reach the level.",
            "",
        ]
        + _matched_forgetting_table(a)
        + [""]
    )
    lines += [
        "## Gradient cosine at matched training loss",
        "",
        "Per seed, mean over 5 training-loss levels in the range both methods' measurement "
        "points cover (each at its selected lr; initialisation excluded).",
        "",
    ]
    lines += _matched_loss_table(a) + [""]
    lines += [
        "## Every run: the whole lr grid",
        "",
        "← marks the dev-selected lr (for the control: Sequential Reptile's selected lr).",
        "",
    ]
    lines += _grid_table(a) + [""]
    lines += ["## Methods", ""] + [f"- `{m}`: {d}" for m, d in describe(cfg).items() if m in a.methods]
    lines += [""]
    notes = [f"warning: {w}" for w in a.edge_warnings()]
    notes += list(cfg.notes) + list(meta.get("budget_notes", []))
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def short_forgetting(cfg: Any) -> str:
    """A column title for the ``forgetting`` field (:data:`config.MEASURES`)."""
    return MEASURES[cfg.forgetting][1]


def reference_numbers(bench: Any) -> dict[str, float]:
    """Reference values: the pre-trained encoder's forgetting measures (a fresh pre-trained top,
    mean over seeds) and the majority-class accuracy."""

    def majority(group: dict[str, Any]) -> float:
        vals = []
        for split in group.values():
            counts = split.class_counts()
            vals.append(max(counts) / max(sum(counts), 1))
        return sum(vals) / len(vals) if vals else float("nan")

    maj_test = [majority(s.test) for s in bench.suites.values()]
    maj_zs = [majority(s.zero_shot) for s in bench.suites.values()]
    before = [
        final_metrics(
            bench.model("pretrained", seed), bench.data[("pretrained", seed)], bench.probe, "lid_loss"
        )
        for seed in bench.cfg.seeds
        if ("pretrained", seed) in bench.data
    ]
    retrieval = [m["retrieval"] for m in before if m["retrieval"] is not None]
    retrieval_pre = sum(retrieval) / len(retrieval) if retrieval else float("nan")
    lid_pre = bench.probe.fit_report["test_loss"]
    return {
        "forgetting_pretrained": lid_pre if bench.cfg.forgetting == "lid_loss" else 1.0 - retrieval_pre,
        "retrieval_pretrained": retrieval_pre,
        "retrieval_error_pretrained": 1.0 - retrieval_pre,
        "lid_loss_pretrained": lid_pre,
        "lid_acc_pretrained": bench.probe.fit_report["test_acc"],
        "majority_test": sum(maj_test) / len(maj_test),
        "majority_zero_shot": sum(maj_zs) / len(maj_zs),
    }


__all__ = ["SR", "count", "markdown", "reference_numbers", "short_forgetting", "write_json"]
