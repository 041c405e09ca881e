"""The alignment-tax frontier: every model of a run (eval.json, candidates.json, the tuned pick in tune/eval.json) as
a point of (SFT metric, preference metric) on the held-out split, the Pareto front among them, and each point's cost.

Nothing here names a model: whatever the evaluation and the candidates stage wrote is a point, so models added by
later stages (trained candidates) appear without a change here. The two axes are ``tune.objectives``' first two.
"""

from __future__ import annotations

from typing import Any

from paft.methods.candidates import MAIN_MODELS
from paft.methods.objectives import higher_is_better, pareto_front
from paft.report.metrics import flat_metrics, metric_info
from paft.report.model import Cell, Column, Figure, Section, Table, Text
from paft.report.style import LABELS, fmt, fmt_value

DEFAULT_AXES = ("sft_nll", "pref_accuracy")
TUNED = "paft_tuned"


def _axes(cfg: dict[str, Any]) -> tuple[str, str]:
    objectives = ((cfg or {}).get("tune") or {}).get("objectives") or DEFAULT_AXES
    return objectives[0], objectives[1]


def _branch_cost(needs: tuple[str, ...], training: dict[str, dict]) -> dict[str, Any]:
    steps = [(training.get(b) or {}).get("steps") for b in needs]
    wall = [(training.get(b) or {}).get("wall_s") for b in needs]
    return {"branches": list(needs), "train_steps": sum(steps) if None not in steps else None,
            "train_s": round(sum(wall), 2) if None not in wall else None, "extra_s": None}


def frontier(rep: dict[str, Any], tuned: dict[str, Any] | None) -> dict[str, Any] | None:
    """report.json's ``frontier``: the axes, and ``points`` (name, family, metrics, cost, on_front), eval.json's
    models first, then the candidates, then the tuned pick. None when fewer than two points have both axes."""
    x, y = _axes(rep.get("config") or {})
    rows = {r["name"]: r for r in ((rep.get("candidates") or {}).get("models") or [])}
    training = rep.get("training") or {}
    points: dict[str, dict[str, Any]] = {}
    for name, row in ((rep.get("eval") or {}).get("models") or {}).items():
        cand = rows.get(name)
        needs = MAIN_MODELS[name][1] if name in MAIN_MODELS else None
        cost = (cand or {}).get("cost") or (_branch_cost(needs, training) if needs is not None else None)
        points[name] = {"name": name, "family": (cand or {}).get("family", "main"), "metrics": flat_metrics(row),
                        "cost": cost}
    for name, r in rows.items():
        points.setdefault(name, {"name": name, "family": r.get("family"), "metrics": dict(r.get("metrics") or {}),
                                 "cost": r.get("cost")})
    if tuned and (tuned.get("models") or {}).get(TUNED):
        points[TUNED] = {"name": TUNED, "family": "tuned", "metrics": flat_metrics(tuned["models"][TUNED]),
                         "cost": tuned.get("cost"), "pick": tuned.get("pick")}
    pts = list(points.values())
    front = set(pareto_front([p["metrics"] for p in pts], [x, y]))
    for i, p in enumerate(pts):
        p["on_front"] = i in front
    if sum(p["metrics"].get(x) is not None and p["metrics"].get(y) is not None for p in pts) < 2:
        return None
    return {"x": x, "y": y, "x_higher_is_better": higher_is_better(x), "y_higher_is_better": higher_is_better(y),
            "points": pts}


def frontier_section(fr: dict[str, Any], tune: dict[str, Any] | None) -> Section:
    """The plot, and each point's axes, front membership and cost."""
    x, y = metric_info(fr["x"]), metric_info(fr["y"])
    body = []
    for p in fr["points"]:
        c = p.get("cost") or {}
        body.append([Cell(LABELS.get(p["name"], p["name"]), swatch=p["name"] if p["family"] == "main" else ""),
                     p["family"], fmt_value(p["metrics"].get(x.key)), fmt_value(p["metrics"].get(y.key)),
                     "✓" if p["on_front"] else "", fmt(c.get("train_steps")),
                     *("–" if v is None else f"{v:.1f}" for v in (c.get("train_s"), c.get("extra_s")))])
    arrows = {True: " ↑", False: " ↓"}
    columns = [Column("model"), Column("family"), Column(x.label + arrows[fr["x_higher_is_better"]], num=True),
               Column(y.label + arrows[fr["y_higher_is_better"]], num=True), Column("on front"),
               Column("training steps", num=True), Column("training (s)", num=True), Column("extra (s)", num=True)]
    blocks: list = [
        Text(f"Every model of the run as a point of {x.label} against {y.label} on the held-out split; the Pareto "
             "front (no other point is better on both) is drawn as a step line. A model left of and below the front "
             "pays an alignment tax that another one avoids."),
        Figure("frontier.png", "frontier", "Held-out metrics of every model and candidate; the front as a step line, "
               "the tuned pick as a star. Right: the tune's trials on the dev split."),
        Table(columns, body),
        Text("Cost: the trained branches each model needs (steps and seconds, summed; the SFT and preference branches "
             "train in parallel, so their seconds overlap in wall time); extra: a candidate's merge and evaluation, "
             "the whole search for the tuned pick."),
    ]
    pick = next((p.get("pick") for p in fr["points"] if p["name"] == TUNED), None)
    if pick:
        params = ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}" for k, v in pick["params"].items())
        blocks.append(Text(f"`{TUNED}`: trial {pick['trial']} of {pick['trials']}, picked on the dev split by "
                           f"`{pick['rule']}` ({params}); its held-out metrics are measured once, after the pick."
                           + (f" {pick['note']}." if pick.get("note") else "")))
    if tune:
        n = sum(t["state"] == "COMPLETE" for t in tune.get("trials", []))
        dev = tune.get("n_dev") or {}
        blocks.append(Text(f"The tune scored {n} candidates on the dev split ({dev.get('sft')} SFT rows, "
                           f"{dev.get('preference')} preference rows) in {tune.get('search_s')} s "
                           "(`tune/trials.json`; docs/tune.md)."))
    return Section("Alignment-tax frontier", blocks, id="frontier", nav="Frontier")
