"""report.html: the run report as one self-contained page (inline CSS, plots as base64 PNG data URIs).

No scripts, fonts, stylesheets or images from elsewhere, so the file can be mailed, archived or
opened offline and shows the same.
"""

from __future__ import annotations

import base64
from html import escape
from typing import Any

import yaml

from paft.report.metrics import LABELS, MODELS, SHORT, fmt_delta, fmt_value
from paft.report.plots import COLORS

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f4f5f7;color:#1f2328;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,
"Liberation Sans","DejaVu Sans",sans-serif}
main{max-width:1200px;margin:0 auto;padding:20px 16px 48px}
h1{font-size:24px;margin:4px 0 2px}
h2{font-size:18px;margin:0 0 10px}
h3{font-size:15px;margin:18px 0 8px}
p{margin:6px 0}
.sub{color:#57606a}
code{font:12.5px ui-monospace,"DejaVu Sans Mono",monospace;background:#eef0f3;padding:1px 4px;border-radius:4px}
nav{margin:10px 0 4px}
nav a{color:#0b5cad;text-decoration:none;margin-right:14px}
section{background:#fff;border:1px solid #dfe2e6;border-radius:8px;padding:16px 20px;margin:14px 0}
.wrap{overflow-x:auto}
table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:4px 0}
th,td{padding:5px 12px;border-bottom:1px solid #eceef1;text-align:left;vertical-align:top}
thead th{border-bottom:2px solid #c9ced4;font-weight:600;white-space:nowrap}
th.group{text-align:center;border-bottom:1px solid #c9ced4;color:#57606a;font-weight:600}
td.num,th.num{text-align:right;white-space:nowrap}
td.num{font-family:ui-monospace,"DejaVu Sans Mono","Liberation Mono",monospace;font-size:13px}
td.metric{white-space:nowrap}
.dir{color:#8c959f;font-size:12px;margin-left:4px}
.sw{display:inline-block;width:10px;height:10px;border-radius:2px;margin-right:6px;vertical-align:baseline}
.best{font-weight:700}
.good{color:#0f6b2c;background:#e3f4e8}
.bad{color:#a3142a;background:#fdebed}
.flat{color:#57606a}
table.values td{vertical-align:middle}
table.deltas td.ctx{background:none;opacity:.8}
table.deltas td.tax{font-weight:600}
th.tax{background:#eef0f3}
.sep{border-left:2px solid #c9ced4}
.cards{display:flex;gap:14px;flex-wrap:wrap;margin:6px 0 4px}
.card{flex:1 1 300px;border:1px solid #dfe2e6;border-radius:8px;padding:10px 14px}
.card h3{margin:0 0 6px}
.card .row{display:flex;justify-content:space-between;gap:12px;padding:2px 0}
.card .v{font-family:ui-monospace,"DejaVu Sans Mono",monospace;padding:0 6px;border-radius:4px}
.legend{color:#57606a;font-size:13px}
.legend span{padding:1px 6px;border-radius:4px}
figure{margin:12px 0 0}
figure img{display:block;max-width:100%;height:auto;border:1px solid #eceef1;border-radius:6px}
figcaption{color:#57606a;font-size:13px;margin-top:4px}
details{margin:6px 0}
summary{cursor:pointer;font-weight:600}
pre{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;background:#f6f8fa;padding:10px;border-radius:6px;
overflow-x:auto;max-height:480px}
td.text{max-width:520px;overflow-wrap:anywhere}
"""


def _img(images: dict[str, bytes], key: str, alt: str, caption: str) -> str:
    if key not in images:
        return ""
    b64 = base64.b64encode(images[key]).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{b64}" alt="{escape(alt)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _arrow(higher: bool | None) -> str:
    title = {True: "higher is better", False: "lower is better", None: "no better direction"}[higher]
    sym = {True: "↑", False: "↓", None: "·"}[higher]
    return f'<span class="dir" title="{title}">{sym}</span>'


def _model_th(m: str, cls: str = "num") -> str:
    return (f'<th class="{cls}"><span class="sw" style="background:{COLORS.get(m, "#333")}"></span>'
            f"{escape(LABELS.get(m, m))}</th>")


def _delta_td(d: float | None, better: int, title: str, extra: str = "") -> str:
    cls = {1: "good", -1: "bad", 0: "flat"}[better]
    data = "" if d is None else f' data-delta="{d!r}"'
    return f'<td class="num {cls}{extra}"{data} title="{escape(title)}">{fmt_delta(d, "−")}</td>'


def _values_table(tax: dict[str, Any], evals: dict[str, Any]) -> str:
    from paft.report.metrics import stderr_of

    models, values = tax["models"], tax["values"]
    head = "".join(_model_th(m) for m in models)
    rows = []
    for x in tax["metrics"]:
        key, higher = x["key"], x["higher_is_better"]
        present = [values[m][key] for m in models if values[m][key] is not None]
        # bold the best model, unless every model ties
        best = (max(present) if higher else min(present)) \
            if higher is not None and len(set(present)) > 1 else None
        cells = []
        for m in models:
            v = values[m][key]
            se = stderr_of(evals.get(m, {}), key)
            text = fmt_value(v) + (f" ± {fmt_value(se)}" if se is not None and v is not None else "")
            cls = " best" if best is not None and v == best else ""
            cells.append(f'<td class="num{cls}">{escape(text)}</td>')
        rows.append(f'<tr><td class="metric">{escape(x["label"])}{_arrow(higher)}'
                    f'<div class="sub" style="font-size:11px">{escape(key)}</div></td>{"".join(cells)}</tr>')
    return (f'<div class="wrap"><table class="values"><thead><tr><th>metric</th>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


def _deltas_table(tax: dict[str, Any]) -> str:
    deltas, better = tax["deltas"], tax["better"]
    groups = [(ref, [m for m in tax["models"] if m in deltas[ref]]) for ref in ("sft", "preference") if ref in deltas]
    if not groups:
        return ""
    top = "".join(f'<th class="group{" sep" if i else ""}" colspan="{len(ms)}">minus {escape(LABELS[ref])}</th>'
                  for i, (ref, ms) in enumerate(groups))
    sub = "".join(f'<th class="num{" tax" if m in ("sequential", "paft") else ""}{" sep" if i and j == 0 else ""}">'
                  f'<span class="sw" style="background:{COLORS.get(m, "#333")}"></span>{escape(SHORT.get(m, m))}</th>'
                  for i, (_, ms) in enumerate(groups) for j, m in enumerate(ms))
    rows = []
    for x in tax["metrics"]:
        key = x["key"]
        cells = []
        for i, (ref, ms) in enumerate(groups):
            for j, m in enumerate(ms):
                extra = (" tax" if m in ("sequential", "paft") else " ctx") + (" sep" if i and j == 0 else "")
                d = deltas[ref][m][key]
                title = f"{LABELS.get(m, m)} − {LABELS[ref]}, {x['label']}"
                cells.append(_delta_td(d, better[ref][m][key], title, extra))
        rows.append(f'<tr><td class="metric">{escape(x["label"])}{_arrow(x["higher_is_better"])}</td>'
                    f'{"".join(cells)}</tr>')
    return (f'<div class="wrap"><table class="deltas"><thead><tr><th rowspan="2">metric</th>{top}</tr>'
            f'<tr>{sub}</tr></thead><tbody>{"".join(rows)}</tbody></table></div>')


def _cards(tax: dict[str, Any]) -> str:
    """The tax at a glance: for sequential and PAFT, each headline metric vs the branch that owns it."""
    deltas, better, values = tax["deltas"], tax["better"], tax["values"]
    keys = {x["key"]: x for x in tax["metrics"]}
    head = [(k, ref) for k, ref in (("sft_exact_match", "sft"), ("sft_nll", "sft"), ("pref_accuracy", "preference"),
                                    ("reward_margin", "preference")) if k in keys and ref in deltas]
    cards = []
    for m in ("sequential", "paft"):
        if m not in values or not head:
            continue
        rows = []
        for k, ref in head:
            cls = {1: "good", -1: "bad", 0: "flat"}[better[ref][m][k]]
            rows.append(f'<div class="row"><span>{escape(keys[k]["label"])} vs {escape(LABELS[ref])}</span>'
                        f'<span><span class="sub">{fmt_value(values[m][k])}</span> '
                        f'<span class="v {cls}">{fmt_delta(deltas[ref][m][k], "−")}</span></span></div>')
        cards.append(f'<div class="card"><h3><span class="sw" style="background:{COLORS[m]}"></span>'
                     f'{escape(LABELS[m])}</h3>{"".join(rows)}</div>')
    return f'<div class="cards">{"".join(cards)}</div>' if cards else ""


def _simple_table(header: list[str], rows: list[list[Any]], num_from: int = 1, text_cols: tuple[int, ...] = ()) -> str:
    def num(i: int) -> bool:
        return i >= num_from and i not in text_cols

    th = "".join(f'<th class="{"num" if num(i) else ""}">{escape(h)}</th>' for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f'<td class="{"num" if num(i) else "text"}">{escape(str(c))}</td>'
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f'<div class="wrap"><table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table></div>'


def _code(text: Any) -> str:
    return f"<code>{escape(str(text))}</code>"


def render_html(rep: dict[str, Any], images: dict[str, bytes]) -> str:
    from paft.report.render import _fmt, sparsity_columns

    cfg, ev = rep["config"], rep.get("eval") or {}
    tax = rep.get("alignment_tax")
    m, p = cfg["merge"], cfg["preference"]
    setup = (f"model {_code(cfg['model']['name'])} · SFT data {_code(cfg['data']['sft']['path'])} · preference data "
             f"{_code(cfg['data']['preference']['path'])} · method {_code(p['method'])} (β {p['beta']}) · merge "
             f"{_code(m['method'])} (weights {escape(str(m['weights']))}, density {m['density']}) · SFT L1 λ "
             f"{cfg['sft']['l1_lambda']}")
    run_name = rep.get("run_dir") or cfg["run"]["output_dir"]
    nav = [("metrics", "Metrics"), ("tax", "Alignment tax"), ("training", "Training"), ("sparsity", "Sparsity"),
           ("details", "Details")]
    parts = [f"<header><h1>PAFT run report</h1><p class=\"sub\">{escape(str(run_name))}</p><p>{setup}</p></header>",
             "<nav>" + "".join(f'<a href="#{a}">{t}</a>' for a, t in nav) + "</nav>"]

    if tax:
        n = f"{ev.get('n_sft_eval')} held-out SFT rows, {ev.get('n_pref_eval')} held-out preference pairs"
        note = (f"<p class=\"sub\">{n}. Bold: the best model on each metric (↑ higher is better, ↓ lower, · "
                "neither). "
                f"Reward margin and accuracy use the DPO implicit reward with {_code(ev.get('reference'))} as "
                f"reference (β {escape(str(ev.get('beta')))}); preference accuracy is the share of pairs where the "
                "model itself gives the chosen reply the higher log-probability.</p>")
        if ev.get("pref_metrics"):
            note += f"<p class=\"sub\">Preference metrics not computed: {escape(str(ev['pref_metrics']))}.</p>"
        bars = _img(images, "metrics", "bar charts of every metric per model",
                    "Every metric, one panel each; colours as in the tables.")
        parts.append(f'<section id="metrics"><h2>Held-out metrics</h2>{_values_table(tax, ev.get("models", {}))}'
                     f"{note}{bars}</section>")
        legend = ('<p class="legend">Each cell is the model\'s value minus the SFT-only (left) or preference-only '
                  '(right) model\'s. The shaded sequential and PAFT columns are the <b>alignment tax</b>: what '
                  'training both objectives cost each branch\'s own skill. <span class="good">green</span> better, '
                  '<span class="bad">red</span> worse (given the metric\'s direction), <span class="flat">grey</span> '
                  "equal or no better direction.</p>")
        parts.append(f'<section id="tax"><h2>Alignment tax</h2>{_cards(tax)}<h3>Differences from the '
                     f"single-objective models</h3>{_deltas_table(tax)}{legend}</section>")

    training = rep.get("training") or {}
    if training:
        rows = [[name, s.get("steps"), s.get("examples", "–"), _fmt(s.get("train_loss")), s.get("wall_s"),
                 s.get("threads", "–"), s.get("device", "–")] for name, s in training.items()]
        table = _simple_table(["branch", "steps", "examples", "mean train loss", "wall (s)", "threads at start",
                               "device"], rows, text_cols=(6,))
        tb = [n for n, s in training.items() if s.get("tensorboard")]
        tb_note = (f"<p class=\"sub\">TensorBoard logs: {', '.join(_code(f'{n}/tb') for n in tb)} "
                   f"(<code>tensorboard --logdir {escape(str(run_name))}</code>).</p>") if tb else ""
        curves = _img(images, "training", "training curves by step", "Loss, SFT NLL, reward margin and reward "
                      "accuracy as logged by each branch's Trainer (log_history.json).")
        parts.append(f'<section id="training"><h2>Training</h2>{table}{tb_note}{curves}</section>')

    sparsity = rep.get("sparsity") or {}
    if sparsity:
        share = sparsity_columns(sparsity)
        rows = [[name] + [f"{s['overall'][k]:.3f}" for k in share] + [f"{s['overall']['mean_abs']:.2e}"]
                for name, s in sparsity.items()]
        table = _simple_table(["branch"] + [k.replace("<=", " ≤ ") for k in share] + ["mean |δ|"], rows)
        hist = all("histogram" in s for s in sparsity.values())
        caption = ("Left: distribution of log10 |δ| over all entries (exact zeros in the legend); then the near-zero "
                   "share per layer and per module type." if hist else
                   "Left: share of entries under each saved threshold (this run's sparsity.json predates the "
                   "histogram); right: the near-zero share per module type.")
        parts.append(f'<section id="sparsity"><h2>Delta sparsity</h2><p class="sub">Share of entries of each '
                     "branch's delta B·A·scale that are near zero; <code>rel ≤ r</code>: |δ| ≤ r × RMS of the "
                     f"base weight of its module.</p>{table}"
                     f"{_img(images, 'sparsity', 'delta sparsity histograms', caption)}"
                     "</section>")

    details = []
    if rep.get("timings_s"):
        details.append("<h3>Wall time per stage</h3>" + _simple_table(
            ["stage", "seconds"], [[k, v] for k, v in rep["timings_s"].items()]))
    samples = ev.get("samples") or {}
    if samples:
        rows = [[LABELS.get(mm, mm), s.get("prompt", ""), s.get("target", ""), s.get("reply", "").strip() or "(empty)"]
                for mm in MODELS for s in samples.get(mm, [])[:3]]
        details.append("<details open><summary>Sample replies (held-out SFT prompts)</summary>"
                       + _simple_table(["model", "prompt", "target", "reply"], rows, num_from=99) + "</details>")
    details.append("<details><summary>Resolved config</summary><pre>"
                   + escape(yaml.safe_dump(cfg, sort_keys=False)) + "</pre></details>")
    v = rep.get("versions") or {}
    if v:
        details.append("<p class=\"sub\">Versions: " + escape(", ".join(f"{k} {v[k]}" for k in v)) + "</p>")
    parts.append(f'<section id="details"><h2>Details</h2>{"".join(details)}</section>')

    title = f"PAFT report · {run_name}"
    return ("<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{escape(str(title))}</title><style>{CSS}</style></head>\n"
            f"<body><main>\n{chr(10).join(parts)}\n</main></body></html>\n")
