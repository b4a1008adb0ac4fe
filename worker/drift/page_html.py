"""The review page's HTML: a model's window timeline, alerts, histograms and out-of-range inputs
as one self-contained document (inline CSS and SVG, no script, no request to anywhere else).

Everything shown comes from Redis or a bundle and is hostile: every value goes through
:func:`_e` (HTML escaping, quotes included) and images only as ``data:`` URIs of checked
base64. The page needs no JavaScript; the server's Content-Security-Policy forbids any.
"""

from __future__ import annotations

from html import escape
from typing import Any

__all__ = ["render_error", "render_index", "render_model"]

_TIER_COLOURS = {"page": "#c62828", "notice": "#ef8f00", "ok": "#2e7d32"}
_BLIND_SPOT = (
    "Estimated accuracy comes from the model's own calibrated confidence, without labels: it "
    "cannot see confident mistakes, which covariate shift can cause. A steady estimate under "
    "a page or notice is not proof that the model is right."
)

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 24px 48px;color:#222;max-width:1200px}
h1{font-size:20px;margin:16px 0 4px}
h2{font-size:16px;margin:24px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:4px 0}td,th{border:1px solid #ddd;padding:3px 6px;
text-align:left;vertical-align:top}th{background:#f4f4f4}.muted{color:#777}
.tier{display:inline-block;padding:0 6px;border-radius:3px;color:#fff;font-weight:600}
.tier-page{background:#c62828}.tier-notice{background:#ef8f00}.tier-ok{background:#2e7d32}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{border:1px solid #ddd;padding:6px}
.card img{width:64px;height:64px;object-fit:contain;image-rendering:pixelated;background:#eee}
.note{background:#fff8e1;border-left:4px solid #ef8f00;padding:4px 8px}
button{cursor:pointer}
"""


def _e(value: Any) -> str:
    """Any value as escaped HTML text (attributes included)."""
    return escape(str(value), quote=True)


def _doc(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _tier(tier: str, assumed: bool = False) -> str:
    name = tier if tier in _TIER_COLOURS else "page"
    suffix = ' <span class="muted">(not recorded)</span>' if assumed else ""
    return f'<span class="tier tier-{name}" data-tier="{name}">{name}</span>{suffix}'


def _accuracy(value: Any) -> str:
    return f"{value:.1%}" if isinstance(value, float | int) else "n/a"


def render_error(title: str, message: str) -> str:
    """A page that says what went wrong."""
    return _doc(title, f'<h1>{_e(title)}</h1><p class="note">{_e(message)}</p>')


def render_index(models: list[dict[str, Any]], redis_url: str) -> str:
    """Every model with drift state or a published version, with its latest verdict."""
    rows = "".join(
        f'<tr><td><a href="/model/{_e(m["short_sha"])}">{_e(m["name"])}</a></td>'
        f"<td><code>{_e(m['short_sha'])}</code></td><td>{_e(', '.join(m['versions']))}</td>"
        f"<td>{_e(m['windows'])}</td><td>{_e(m['open_alerts'])}</td></tr>"
        for m in models
    )
    body = (
        f'<h1>imgq drift review</h1><p class="muted">Redis {_e(redis_url)}</p>'
        "<table><tr><th>model</th><th>drift key (model sha256)</th><th>published versions</th>"
        f"<th>windows kept</th><th>open alerts</th></tr>{rows}</table>"
    )
    if not models:
        body += "<p>No model has drift state or a published version yet.</p>"
    return _doc("imgq drift review", body)


def render_model(view: dict[str, Any], token: str) -> str:
    """One model's page: :func:`worker.drift.page.ReviewData.model_view` rendered."""
    sha = view["short_sha"]
    head = (
        '<p><a href="/">all models</a></p>'
        f'<h1 id="model-name">{_e(view["name"])}</h1>'
        f'<p class="muted">model sha256 {_e(sha)}; published versions: '
        f"{_e(', '.join(view['versions']) or 'none')}; open window: "
        f"{_e(view['open_window_images'])} images</p>"
    )
    if view.get("error"):
        head += f'<p class="note">{_e(view["error"])}</p>'
    return _doc(
        f"imgq drift: {view['name']}",
        head
        + _alerts(view["alerts"], sha, token)
        + _timeline(view["verdicts"])
        + _histograms(view["histograms"], view.get("histogram_window"))
        + _novel(view.get("novel", []), view.get("gallery", []))
        + _out_of_range(view["out_of_range"], view["training_samples"]),
    )


def _alerts(alerts: list[dict[str, Any]], sha: str, token: str) -> str:
    rows = []
    for a in alerts:
        listed = a.get("features")
        features = "; ".join(
            f"{f.get('feature')} {f.get('summary', '')} (PSI {f.get('psi')})"
            for f in (listed if isinstance(listed, list) else [])
            if isinstance(f, dict)
        )
        if a["acked"]:
            action = "acknowledged"
        else:
            action = (
                f'<form method="post" action="/model/{_e(sha)}/ack">'
                f'<input type="hidden" name="token" value="{_e(token)}">'
                f'<input type="hidden" name="alert" value="{_e(a["id"])}">'
                f'<button type="submit" id="ack-{_e(a["id"])}">Acknowledge</button></form>'
            )
        window = a.get("window", {})
        rows.append(
            f'<tr class="alert" data-alert="{_e(a["id"])}"><td>{_e(a["id"])}</td>'
            f"<td>{_tier(str(a.get('tier', 'page')), 'tier' not in a)}</td>"
            f"<td>{_e(a.get('time', ''))}</td><td>{_e(window.get('id'))} "
            f"({_e(window.get('n_images'))} images)</td><td>{_e(features)}</td>"
            f"<td>{_e(a['state'])}</td><td>{action}</td></tr>"
        )
    table = (
        "<table><tr><th>alert</th><th>tier</th><th>time</th><th>window</th><th>features</th>"
        f"<th>state</th><th></th></tr>{''.join(rows)}</table>"
        if rows
        else "<p>No alerts.</p>"
    )
    return f'<h2 id="alerts">Alerts</h2>{table}'


def _timeline(verdicts: list[dict[str, Any]]) -> str:
    """A strip of windows coloured by tier (oldest left), and a table of the newest."""
    if not verdicts:
        return '<h2 id="timeline">Windows</h2><p>No window judged yet.</p>'
    oldest_first = verdicts[::-1]
    bar_w = max(3, min(16, 900 // len(oldest_first)))
    bars = []
    for i, v in enumerate(oldest_first):
        acc = v["estimated_accuracy"]
        height = 20 + (40 * acc if isinstance(acc, float | int) else 0)
        bars.append(
            f'<rect x="{i * bar_w}" y="{70 - height:.1f}" width="{bar_w - 1}" '
            f'height="{height:.1f}" fill="{_TIER_COLOURS.get(v["tier"], "#c62828")}">'
            f"<title>window {_e(v['window'].get('id'))}: {_e(v['tier'])}, estimated accuracy "
            f"{_accuracy(acc)}</title></rect>"
        )
    svg = (
        f'<svg width="{bar_w * len(oldest_first)}" height="72" role="img" '
        f'aria-label="windows by tier">{"".join(bars)}</svg>'
    )
    rows = []
    for v in verdicts[:50]:
        w = v["window"]
        flagged = ", ".join(
            f"{_e(f['name'])} ({_e(f['tier'])}, PSI {f['psi']:.2f})" for f in v["flagged"]
        )
        rows.append(
            f'<tr class="verdict" data-window="{_e(w.get("id"))}"><td>{_e(w.get("id"))}</td>'
            f"<td>{_e(w.get('end', ''))}</td><td>{_e(w.get('n_images'))}</td>"
            f"<td>{_tier(v['tier'], v['tier_assumed'])}</td>"
            f'<td class="accuracy">{_accuracy(v["estimated_accuracy"])}</td>'
            f"<td>{flagged or '-'}</td></tr>"
        )
    return (
        '<h2 id="timeline">Windows</h2><p class="muted">Bar height: estimated accuracy; '
        f"colour: tier (red page, amber notice, green ok).</p>{svg}"
        f'<p class="note">{_e(_BLIND_SPOT)}</p>'
        "<table><tr><th>window</th><th>end</th><th>images</th><th>tier</th>"
        f"<th>estimated accuracy</th><th>features not ok</th></tr>{''.join(rows)}</table>"
    )


def _histogram_svg(h: dict[str, Any]) -> str:
    n = len(h["reference"])
    width, height, base = 300, 120, 100
    slot = width / max(1, n)
    top = max([*h["reference"], *h["window"], 1e-9])
    bars = []
    for i, (r, c, label) in enumerate(zip(h["reference"], h["window"], h["bins"], strict=True)):
        for j, (share, colour) in enumerate(((r, "#5c7cfa"), (c, "#f08c00"))):
            bar_h = base * share / top
            bars.append(
                f'<rect x="{i * slot + j * slot / 2:.1f}" y="{base - bar_h:.1f}" '
                f'width="{slot / 2 - 1:.1f}" height="{bar_h:.1f}" fill="{colour}">'
                f"<title>{_e(label)}: {'reference' if j == 0 else 'window'} {share:.1%}"
                "</title></rect>"
            )
    return (
        f'<svg width="{width}" height="{height}" role="img" aria-label="{_e(h["name"])}">'
        f'{"".join(bars)}<text x="0" y="{height - 4}" font-size="10">'
        f"{_e(h['bins'][0])} .. {_e(h['bins'][-1])}</text></svg>"
    )


def _histograms(histograms: list[dict[str, Any]], window_id: Any) -> str:
    if not histograms:
        return (
            '<h2 id="histograms">Features</h2><p>No histograms: no window judged yet, or the '
            "model's reference is not available (publish its bundle, or pass --model).</p>"
        )
    cards = "".join(
        f'<div class="card histogram" data-feature="{_e(h["name"])}"><b>{_e(h["name"])}</b> '
        f"PSI {h['psi']:.3f} {_tier(h['tier']) if h['tier'] else ''}<br>"
        f'<span class="muted">{_e(h["summary"])}</span><br>{_histogram_svg(h)}</div>'
        for h in histograms
    )
    return (
        '<h2 id="histograms">Features: reference vs latest window</h2><p class="muted">'
        f'<span style="color:#5c7cfa">&#9632;</span> training reference, '
        f'<span style="color:#f08c00">&#9632;</span> window {_e(window_id)}; shares per '
        f'bin.</p><div class="grid">{cards}</div>'
    )


def _novel(thumbs: list[dict[str, Any]], gallery: list[dict[str, Any]]) -> str:
    """Recent novel inputs, each beside the training images nearest to it in the model's
    features."""
    if not thumbs:
        return '<h2 id="novel">Novel inputs</h2><p>None kept.</p>'
    cards = []
    for t in thumbs:
        near = "".join(
            f'<img src="{_e(gallery[i]["uri"])}" alt="nearest training image, '
            f'{_e(gallery[i]["label"])}" title="{_e(gallery[i]["label"])}">'
            for i in t["neighbours"]
            if gallery[i]["uri"] is not None
        )
        novelty = "n/a" if t["novelty"] is None else f"{t['novelty']:.2f}"
        cards.append(
            f'<div class="card novel"><img src="data:image/jpeg;base64,{_e(t["jpeg_b64"])}" '
            f'alt="novel input"> {near or "<i>no training image</i>"}<br>'
            f"novelty <b>{_e(novelty)}</b> (1 = threshold); predicted "
            f"<b>{_e(t['label'] if t['label'] is not None else 'n/a')}</b><br>"
            f'<span class="muted">{_e(t["time"])}</span></div>'
        )
    return (
        '<h2 id="novel">Novel inputs</h2><p class="muted">Each recent input the model finds '
        "unlike its training classes in its own features (left), beside the training images "
        "nearest to it there: a new kind of object the model answers as something it knows. "
        f'Label a few and retrain (docs/drift.md).</p><div class="grid">{"".join(cards)}</div>'
    )


def _out_of_range(thumbs: list[dict[str, Any]], samples: dict[str, list[str]]) -> str:
    if not thumbs:
        return '<h2 id="out-of-range">Out-of-range inputs</h2><p>None kept.</p>'
    cards = []
    for t in thumbs:
        label = t.get("label")
        training = "".join(
            f'<img src="{_e(uri)}" alt="training sample of {_e(label)}">'
            for uri in samples.get(str(label), [])
        )
        cards.append(
            f'<div class="card oor"><img src="data:image/jpeg;base64,{_e(t["jpeg_b64"])}" '
            f'alt="out-of-range input"> {training or "<i>no training sample</i>"}<br>'
            f"predicted <b>{_e(label if label is not None else 'n/a')}</b>; outside: "
            f"{_e(', '.join(map(str, t['features'])))}<br>"
            f'<span class="muted">{_e(t.get("time", ""))}</span></div>'
        )
    return (
        '<h2 id="out-of-range">Out-of-range inputs</h2><p class="muted">Each recent input '
        "outside the training range (left) beside training images of the class the model "
        f'predicted for it.</p><div class="grid">{"".join(cards)}</div>'
    )
