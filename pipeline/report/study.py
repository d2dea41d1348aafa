"""The study on a page: the recommendation first, then the learning curves, every arm with its intervals, and the
paired comparisons. The same section is part of the run report (``detflow report``, when
``reports/study/results.json`` exists) and stands alone as ``reports/study/report.html``. Charts are matplotlib SVG
inline (:mod:`pipeline.report.charts`), so the page opens offline and requests nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pipeline.report.charts as charts


def learning_curve_svg(results: dict[str, Any]) -> str | None:
    """Test mAP50 against the training fraction, one panel per initialisation (COCO, scratch) on a shared axis,
    one line per recipe (and seed), the 95 % patient-bootstrap interval of each arm shaded around its line."""
    curves = results.get("learning_curves") or []
    if not curves:
        return None
    plt = charts._pyplot()
    inits = list(dict.fromkeys(c["init"] for c in curves))
    recipes = list(dict.fromkeys(c["recipe"] for c in curves))
    fractions = sorted({p["fraction"] for c in curves for p in c["points"]})
    fig, axes = plt.subplots(1, len(inits), figsize=(3.6 * len(inits) + 1.6, 3.6), sharey=True, squeeze=False)
    for ax, init in zip(axes[0], inits, strict=True):
        for c in (c for c in curves if c["init"] == init):
            colour = charts._PALETTE[recipes.index(c["recipe"]) % len(charts._PALETTE)]
            xs = [p["fraction"] for p in c["points"]]
            ax.fill_between(xs, [p["ci95"][0] for p in c["points"]], [p["ci95"][1] for p in c["points"]],
                            color=colour, alpha=0.12, linewidth=0)
            ax.plot(xs, [p["map50"] for p in c["points"]], "--" if c["seed"] else "-", marker="o",
                    markersize=3.5, linewidth=1.6, color=colour,
                    label=c["recipe"] + (f", seed {c['seed']}" if c["seed"] else ""))
        if len(fractions) > 1 and fractions[0] > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(fractions, [f"{f * 100:.4g} %" for f in fractions])
        ax.minorticks_off()
        ax.set_ylim(0, 1.0)
        ax.set_title("from COCO weights" if init == "coco" else "from scratch" if init == "scratch" else init)
        ax.set_xlabel("share of the training split")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"test mAP50 ({results.get('split', 'test')}), 95 % CI")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle(f"Learning curves ({results['budget']['rule']} budget, {results['budget']['imgsz']} px)", fontsize=10)
    fig.tight_layout()
    return charts._svg(fig)


def study_section(results: dict[str, Any] | None, source: Path | None = None) -> dict[str, Any]:
    """The template's view of results.json (None: the section says there is no study)."""
    if results is None:
        return {"present": False, "source": str(source) if source else None}
    arms = [a for a in results.get("arms", []) if a.get("map50") is not None]
    vs_best = {c["arm"]: c for c in results["comparisons"]["vs_best"]}
    good = set(results["recommendation"].get("as_good_as_best") or [])
    rows = []
    for a in sorted(arms, key=lambda a: -a["map50"]):
        rows.append({**a, "vs_best": vs_best.get(a["name"]), "as_good": a["name"] in good,
                     "is_best": a["name"] == results.get("best"),
                     "recommended": a["name"] == results["recommendation"].get("arm")})
    return {"present": True, "source": str(source) if source else None, "results": results, "rows": rows,
            "chart": learning_curve_svg(results), "recommendation": results["recommendation"],
            "budget": results["budget"], "bootstrap": results["bootstrap"], "missing_arms": results["missing"],
            "external_sets": results.get("external_sets") or [],
            "coco_vs_scratch": results["comparisons"]["coco_vs_scratch"],
            "vs_reference": results["comparisons"]["vs_reference"], "n_arms": len(results.get("arms", []))}


def render_study_page(results: dict[str, Any], source: Path | None = None) -> str:
    """``reports/study/report.html``: the study section alone, one self-contained page."""
    from pipeline.report.render import render_page

    return render_page("study_page.html.j2", s=study_section(results, source))
