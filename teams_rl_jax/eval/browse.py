"""The dataset browser: ``eval/browse.html``, one self-contained static page over the generate trace.

:func:`write_browse` reads ``data/trace.jsonl`` (and each ``data/baselines/<name>/trace.jsonl``: every
evolution step of every seed, kept or eliminated; see :mod:`teams_rl_jax.evolve.stage`) and writes one
HTML file that needs nothing else: inline CSS, vanilla JS, the trace embedded as JSON in a
``<script type="application/json">`` tag (every ``<`` written as ``\\u003c``, so no record text can
close the tag), the eval report's PNGs embedded as base64 ``<img>``.

The page shows each seed's chain (operation, instruction after the step, the reviewer's verdict and raw
reply, the rule that dropped it, the expert's answer), filtered by operation, rule (``kept``: steps no
rule dropped) and arm (the selector), 50 seeds per page (prev/next). The filters and the page live in the
URL hash (``#op=deepening&rule=no_gain&arm=random&page=2``), so a link (or a headless browser) opens a
given view. Record text reaches the DOM only through ``textContent``: a record that holds HTML shows as
text. A script error or ``console.error`` is written into ``<div id="errors">``; the page sets
``<body data-ready="1">`` once it has rendered.

Size tried: a synthetic trace of 20,000 steps (4,000 seeds x 5, ~100-character instructions, ~140-character
answers) builds in about 1 s into a 7.6 MB page; headless Chromium opens it at a filtered page 3 of 27 in
about 6 s wall (start-up included) on a busy 2-core machine (tests/test_browse.py). Only the page's 50
seeds are in the DOM at a time.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Iterable

PAGE_SEEDS = 50  # seeds per page

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1em 2em;color:#222}
h1{font-size:1.4em}h3{margin:.2em 0;font-size:1em}
#controls{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:1px solid #ccc}
#controls label{margin-right:1em}
.seed{border:1px solid #ddd;border-radius:4px;margin:.8em 0;padding:.5em}
.seedtext{color:#555;white-space:pre-wrap;margin:.2em 0}
table{border-collapse:collapse;width:100%;table-layout:fixed}
th.c-step{width:3em}th.c-op{width:11em}th.c-rule{width:8em}th.c-verdict{width:10em}
td,th{border-top:1px solid #eee;padding:2px 6px;vertical-align:top;text-align:left}
td{white-space:pre-wrap;word-break:break-word}
tr.dropped td{color:#999}
tr.dropped td.rule{color:#b00;font-weight:bold}
tr.match{background:#fffbe0}
#errors{color:#b00}
.plots img{max-width:48%;margin:4px;border:1px solid #eee}
"""

_ERRORS_JS = """
(function(){
  var box = document.getElementById('errors');
  function report(msg){ var p = document.createElement('p'); p.className = 'err'; p.textContent = String(msg); box.appendChild(p); }
  window.addEventListener('error', function(e){ report((e && e.message) || 'script error'); });
  var orig = console.error;
  console.error = function(){ report(Array.prototype.join.call(arguments, ' ')); if (orig) orig.apply(console, arguments); };
  window.__report = report;
})();
"""

_MAIN_JS = """
(function(){
  var PAGE = %(page)d;
  var data = JSON.parse(document.getElementById('trace-data').textContent);
  var seeds = data.seeds;
  var KEYS = ['op', 'rule', 'arm'];
  function el(tag, cls, text){ var e = document.createElement(tag); if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text); return e; }
  function distinct(f){ var s = {}; seeds.forEach(function(sd){ f(sd).forEach(function(v){ s[v] = 1; }); });
    return Object.keys(s).sort(); }
  var values = {
    op: distinct(function(sd){ return sd.steps.map(function(s){ return s.op; }); }),
    rule: ['kept'].concat(distinct(function(sd){ return sd.steps.filter(function(s){ return s.rule !== null; })
                                                             .map(function(s){ return s.rule; }); })),
    arm: distinct(function(sd){ return [sd.arm]; })
  };
  function state(){
    var st = {op: '', rule: '', arm: '', page: 1};
    location.hash.replace(/^#/, '').split('&').forEach(function(kv){
      if (!kv) return; var i = kv.indexOf('='); if (i < 0) return;
      st[decodeURIComponent(kv.slice(0, i))] = decodeURIComponent(kv.slice(i + 1)); });
    st.page = Math.max(1, parseInt(st.page, 10) || 1);
    return st;
  }
  function setState(st){
    var parts = [];
    KEYS.forEach(function(k){ if (st[k]) parts.push(k + '=' + encodeURIComponent(st[k])); });
    if (st.page > 1) parts.push('page=' + st.page);
    location.hash = parts.join('&');
  }
  function stepMatches(s, st){
    if (st.op && s.op !== st.op) return false;
    if (st.rule === 'kept') return s.rule === null;
    if (st.rule && s.rule !== st.rule) return false;
    return true;
  }
  function seedMatches(sd, st){
    if (st.arm && sd.arm !== st.arm) return false;
    if (!st.op && !st.rule) return true;
    return sd.steps.some(function(s){ return stepMatches(s, st); });
  }
  function verdict(s){
    if (s.verdict === null || s.verdict === undefined) return s.reply === null ? '' : 'unparseable: ' + s.reply;
    var v = s.verdict >= 1 ? 'Not Equal' : 'Equal';
    return v + (s.reply === null || s.reply.trim() === v ? '' : ' (reply: ' + s.reply + ')');
  }
  var selects = {};
  KEYS.forEach(function(k){
    var sel = document.getElementById('f-' + k);
    sel.appendChild(el('option', null, 'all')).value = '';
    values[k].forEach(function(v){ sel.appendChild(el('option', null, v)).value = v; });
    sel.addEventListener('change', function(){ var st = state(); st[k] = sel.value; st.page = 1; setState(st); });
    selects[k] = sel;
  });
  document.getElementById('prev').addEventListener('click', function(){ var st = state(); st.page -= 1; setState(st); });
  document.getElementById('next').addEventListener('click', function(){ var st = state(); st.page += 1; setState(st); });
  function render(){
    var st = state();
    KEYS.forEach(function(k){ selects[k].value = st[k] || ''; });
    var shown = seeds.filter(function(sd){ return seedMatches(sd, st); });
    var pages = Math.max(1, Math.ceil(shown.length / PAGE));
    var page = Math.min(st.page, pages);
    var box = document.getElementById('seeds');
    while (box.firstChild) box.removeChild(box.firstChild);
    shown.slice((page - 1) * PAGE, page * PAGE).forEach(function(sd){
      var div = el('div', 'seed');
      div.appendChild(el('h3', null, sd.id + ' \\u00b7 ' + sd.arm + ' \\u00b7 ' + sd.steps.length + ' steps'));
      div.appendChild(el('p', 'seedtext', 'seed: ' + sd.seed));
      var table = el('table'), head = el('tr');
      [['step', 'c-step'], ['operation', 'c-op'], ['instruction after the step', 'c-text'], ['reviewer', 'c-verdict'],
       ['rule', 'c-rule'], ['answer', 'c-answer']].forEach(function(h){ head.appendChild(el('th', h[1], h[0])); });
      table.appendChild(head);
      sd.steps.forEach(function(s){
        var cls = 'step' + (s.rule !== null ? ' dropped' : '') + ((st.op || st.rule) && stepMatches(s, st) ? ' match' : '');
        var tr = el('tr', cls);
        tr.appendChild(el('td', null, s.step));
        tr.appendChild(el('td', 'op', s.op));
        tr.appendChild(el('td', 'text', s.instruction));
        tr.appendChild(el('td', 'verdict', verdict(s)));
        tr.appendChild(el('td', 'rule', s.rule === null ? 'kept' : s.rule));
        tr.appendChild(el('td', 'answer', s.answer === null ? '' : s.answer));
        table.appendChild(tr);
      });
      div.appendChild(table);
      box.appendChild(div);
    });
    var nsteps = 0; shown.forEach(function(sd){ nsteps += sd.steps.length; });
    document.getElementById('pageinfo').textContent = 'page ' + page + ' of ' + pages + ' \\u00b7 ' + shown.length +
      ' of ' + seeds.length + ' seeds \\u00b7 ' + nsteps + ' steps';
    document.getElementById('prev').disabled = page <= 1;
    document.getElementById('next').disabled = page >= pages;
    document.body.setAttribute('data-ready', '1');
  }
  window.addEventListener('hashchange', render);
  try { render(); } catch (e) { window.__report(e && e.stack ? e.stack : e); }
})();
"""


def read_trace(paths: Iterable[Path]) -> list[dict]:
    """The trace lines of every existing file in ``paths`` (in order)."""
    out = []
    for p in paths:
        p = Path(p)
        if p.is_file():
            out += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    return out


def page_data(steps: list[dict]) -> dict:
    """``{"seeds": [{"id", "arm", "seed" (the seed's instruction), "steps": [...]}]}``: the trace grouped
    by (arm, seed) in first-seen order; each step keeps what the page shows."""
    seeds: dict[tuple[str, str], dict] = {}
    for e in steps:
        key = (str(e.get("selector")), str(e.get("seed_id")))
        if key not in seeds:
            seeds[key] = {"id": key[1], "arm": key[0], "seed": e.get("before", ""), "steps": []}
        seeds[key]["steps"].append({"step": e.get("step"), "op": e.get("op"), "instruction": e.get("instruction"),
                                    "verdict": e.get("verdict"), "reply": e.get("reviewer_reply"),
                                    "rule": e.get("rule"), "answer": e.get("answer")})
    return {"seeds": list(seeds.values())}


def embed_json(obj) -> str:
    """JSON safe inside a ``<script>`` element: every ``<`` escaped, so ``</script>`` cannot occur."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def build_page(steps: list[dict], plots: Iterable[Path] = (), title: str = "Generated dataset: every step") -> str:
    """The page's HTML (see the module docstring)."""
    imgs = "".join(f'<img alt="{html.escape(Path(p).stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(Path(p).read_bytes()).decode()}">' for p in plots)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{_CSS}</style></head>
<body>
<div id="errors"></div>
<script>{_ERRORS_JS}</script>
<h1>{html.escape(title)}</h1>
<div id="controls">
<label>operation <select id="f-op"></select></label>
<label>rule <select id="f-rule"></select></label>
<label>arm <select id="f-arm"></select></label>
<button id="prev" type="button">prev</button> <button id="next" type="button">next</button>
<span id="pageinfo"></span>
</div>
<div id="seeds"></div>
{f'<h2>Dataset report plots</h2><div class="plots">{imgs}</div>' if imgs else ''}
<script type="application/json" id="trace-data">{embed_json(page_data(steps))}</script>
<script>{_MAIN_JS % {"page": PAGE_SEEDS}}</script>
</body></html>
"""


def write_browse(traces: Iterable[Path], out: Path, plots_dir: Path | None = None) -> dict | None:
    """Write the page to ``out`` from the trace files that exist (None and nothing written when none
    does); ``plots_dir``: embed its ``*.png``. Returns ``{"seeds", "steps", "bytes"}``."""
    traces = [Path(p) for p in traces if Path(p).is_file()]
    if not traces:
        return None
    steps = read_trace(traces)
    plots = sorted(Path(plots_dir).glob("*.png")) if plots_dir is not None else []
    text = build_page(steps, plots)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return {"seeds": len({(e.get("selector"), e.get("seed_id")) for e in steps}), "steps": len(steps),
            "bytes": len(text.encode())}
