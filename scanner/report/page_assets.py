"""The report page's stylesheet and script, embedded inline so the page needs no network.

Kept as Python strings (not package data files) so an installed wheel always carries them.
The script renders one gallery page at a time from the JSON embedded in the page: the DOM
never holds more than `page_size` cards, whatever the gallery's size. Text from the scan
(prompts, captions, ids) is inserted with `textContent`, never as HTML.
"""

CSS = """
:root {
  --ink: #1f2933; --muted: #616e7c; --line: #e4e7eb; --bg: #f5f7fa; --panel: #ffffff;
  --accent: #1f3a5f; --radius: 10px;
}
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif;
  color: var(--ink); background: var(--bg); }
header.top { background: linear-gradient(120deg, #13263f, #1f3a5f); color: #fff; padding: 22px 0 18px; }
.wrap { max-width: 1320px; margin: 0 auto; padding: 0 24px; }
header.top h1 { margin: 0 0 4px; font-size: 22px; font-weight: 650; letter-spacing: .2px; }
header.top .meta { color: #c9d4e3; font-size: 13px; }
header.top .meta code { color: #fff; }
nav.toc { display: flex; flex-wrap: wrap; gap: 6px 18px; margin-top: 12px; font-size: 13px; }
nav.toc a { color: #dbe6f5; text-decoration: none; border-bottom: 1px dotted #8aa4c4; }
.kpis { display: grid; grid-template-columns: repeat(auto-fit, minmax(125px, 1fr)); gap: 12px; margin: 20px 0 4px; }
.kpi { background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); padding: 12px 14px; }
.kpi .v { font-size: 22px; font-weight: 650; }
.kpi .k { color: var(--muted); font-size: 12px; text-transform: uppercase; letter-spacing: .5px; }
section.panel { background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius);
  padding: 18px 20px; margin: 18px 0; }
section.panel h2 { margin: 0 0 4px; font-size: 17px; }
section.panel p.lead { margin: 0 0 14px; color: var(--muted); max-width: 900px; }
.split { display: grid; grid-template-columns: minmax(0, 1.1fr) minmax(0, 1fr); gap: 20px; align-items: start; }
@media (max-width: 980px) { .split { grid-template-columns: 1fr; } }
.stack img.plot { display: block; width: 100%; max-width: 640px; height: auto; border: 1px solid var(--line);
  border-radius: 6px; margin-bottom: 14px; }
.clip-last td:last-child { max-width: 560px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.split img.plot { width: 100%; height: auto; border: 1px solid var(--line); border-radius: 6px; }
table.data { border-collapse: collapse; width: 100%; font-size: 13px; font-variant-numeric: tabular-nums; }
table.data th, table.data td { padding: 5px 8px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
table.data th { background: #f0f3f7; font-weight: 600; color: #3e4c59; position: sticky; top: 0; }
table.data td.num, table.data th.num { text-align: right; }
table.data tr:nth-child(even) td { background: #fafbfc; }
table.data .sub { color: var(--muted); font-size: 11px; margin-left: 4px; }
.scroll { max-height: 420px; overflow: auto; border: 1px solid var(--line); border-radius: 6px; }
.badge { display: inline-block; min-width: 30px; text-align: center; padding: 1px 7px; border-radius: 999px;
  color: #fff; font-weight: 700; font-size: 12px; letter-spacing: .3px; }
.badge.VM { background: var(--VM); } .badge.FM { background: var(--FM); }
.badge.BM { background: var(--BM); } .badge.NM { background: var(--NM); color: #1f2933; }
.chip { display: inline-block; padding: 1px 8px; border-radius: 999px; background: #eef2f7; color: #334e68; font-size: 12px; }
.filters { display: flex; flex-wrap: wrap; gap: 10px 18px; align-items: center; padding: 10px 12px;
  background: #f0f3f7; border-radius: 8px; margin-bottom: 14px; }
.filters label { font-size: 13px; color: #334e68; display: inline-flex; align-items: center; gap: 5px; }
.filters select, .filters input[type=search] { font: inherit; padding: 4px 6px; border: 1px solid #cbd2d9; border-radius: 6px; background: #fff; }
.filters input[type=search] { width: 220px; }
.filters .group { display: inline-flex; gap: 10px; align-items: center; }
.filters .spacer { flex: 1; }
.pager { display: flex; gap: 8px; align-items: center; justify-content: flex-end; margin: 12px 0 0; font-size: 13px; }
.pager button { font: inherit; padding: 4px 12px; border: 1px solid #cbd2d9; background: #fff; border-radius: 6px; cursor: pointer; }
.pager button:disabled { opacity: .45; cursor: default; }
#gallery { display: grid; grid-template-columns: repeat(auto-fill, minmax(310px, 1fr)); gap: 14px; }
.card { border: 1px solid var(--line); border-radius: var(--radius); background: #fff; overflow: hidden;
  border-top: 4px solid var(--NM); display: flex; flex-direction: column; }
.card.VM { border-top-color: var(--VM); } .card.FM { border-top-color: var(--FM); } .card.BM { border-top-color: var(--BM); }
.card-head { display: flex; gap: 6px; align-items: center; padding: 8px 10px 6px; flex-wrap: wrap; }
.card-head .where { margin-left: auto; color: var(--muted); font-size: 12px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 6px; padding: 0 10px; }
.pair figure { margin: 0; }
.frame { position: relative; aspect-ratio: 1 / 1; background: #e4e7eb; border-radius: 6px; overflow: hidden; }
.frame img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: cover; display: block; }
.hide-masks .frame img.mask { display: none; }
.pair figcaption { font-size: 11px; color: var(--muted); margin-top: 3px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.swatch { display: inline-block; width: 9px; height: 9px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.scores { padding: 8px 10px 2px; display: grid; gap: 3px; }
.score { display: grid; grid-template-columns: 52px 1fr 44px; gap: 8px; align-items: center; font-size: 12px; }
.score .name { color: var(--muted); }
.score.decides .name, .score.decides .val { color: var(--ink); font-weight: 700; }
.bar { position: relative; height: 8px; background: #edf0f3; border-radius: 4px; overflow: visible; }
.bar .fill { position: absolute; left: 0; top: 0; bottom: 0; border-radius: 4px; background: #9aa5b1; }
.score.decides .bar .fill { background: var(--deciding, #1f3a5f); }
.bar .tau { position: absolute; top: -3px; bottom: -3px; width: 2px; background: #1f2933; opacity: .55; }
.score .val { text-align: right; font-variant-numeric: tabular-nums; }
.card .text { padding: 6px 10px 10px; font-size: 12px; }
.card .prompt { margin: 0 0 3px; color: var(--ink); display: -webkit-box; -webkit-line-clamp: 2; -webkit-box-orient: vertical; overflow: hidden; }
.card .caption { margin: 0; color: var(--muted); display: -webkit-box; -webkit-line-clamp: 1; -webkit-box-orient: vertical; overflow: hidden; }
.card .ids { margin: 4px 0 0; color: #7b8794; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 11px; }
.empty { padding: 30px; text-align: center; color: var(--muted); grid-column: 1 / -1; }
.note { color: var(--muted); font-size: 12px; margin: 8px 0 0; }
footer { color: var(--muted); font-size: 12px; padding: 10px 0 40px; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0; font-size: 13px; }
dl.kv dt { color: var(--muted); } dl.kv dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; word-break: break-all; }
.cols { display: grid; grid-template-columns: repeat(auto-fit, minmax(320px, 1fr)); gap: 20px; }
h3 { font-size: 14px; margin: 4px 0 8px; }
"""

JS = """
(function () {
  "use strict";
  const data = JSON.parse(document.getElementById("gallery-data").textContent);
  const cards = data.cards;
  const grid = document.getElementById("gallery");
  const state = { labels: new Set(["VM", "FM", "BM"]), method: "", cluster: "", query: "", page: 0 };
  const DECIDING = { VM: "m_full", FM: "m_fg", BM: "m_bg" };
  cards.forEach(function (c, i) { c.index = i; });

  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function image(src, cls, id, alt) {
    const img = el("img", "gallery-img " + cls);
    img.id = id; img.src = src; img.alt = alt; img.decoding = "async";
    return img;
  }

  function figure(c, kind) {
    const fig = el("figure");
    const frame = el("div", "frame");
    const gen = kind === "gen";
    frame.append(
      image(gen ? c.gen : c.ref, "photo " + kind, "img-" + kind + "-" + c.index,
            gen ? "generated image " + c.gen_id : "training image " + c.ref_id),
      image(gen ? c.gen_mask : c.ref_mask, "mask " + kind + "-mask", "img-" + kind + "mask-" + c.index,
            "foreground mask")
    );
    const cap = el("figcaption");
    const sw = el("span", "swatch"); sw.style.background = gen ? data.tints.gen : data.tints.ref;
    cap.append(sw, document.createTextNode(gen ? "generated" : "training image"));
    cap.title = gen ? c.gen_id : c.ref_id;
    fig.append(frame, cap);
    return fig;
  }

  function scoreRow(c, key, name) {
    const row = el("div", "score" + (DECIDING[c.label] === key ? " decides" : ""));
    const bar = el("div", "bar");
    const fill = el("span", "fill");
    fill.style.width = (Math.max(0, Math.min(1, c[key])) * 100).toFixed(1) + "%";
    const tau = el("span", "tau"); tau.style.left = (data.tau * 100).toFixed(1) + "%"; tau.title = "tau = " + data.tau;
    bar.append(fill, tau);
    row.append(el("span", "name", name), bar, el("span", "val", c[key].toFixed(3)));
    return row;
  }

  function card(c) {
    const node = el("article", "card " + c.label);
    node.id = "card-" + c.index;
    node.dataset.label = c.label; node.dataset.method = c.method;
    node.dataset.cluster = c.cluster === null ? "" : String(c.cluster);
    node.style.setProperty("--deciding", data.colors[c.label]);
    const head = el("div", "card-head");
    head.append(el("span", "badge " + c.label, c.label), el("span", "chip", data.method_names[c.method] || c.method));
    if (c.cluster !== null) head.append(el("span", "chip", "cluster " + c.cluster));
    head.append(el("span", "where", (c.branch || "n/a") + " \\u00b7 fg " + Math.round(c.fg_fraction * 100) + "%"));
    const pair = el("div", "pair");
    pair.append(figure(c, "gen"), figure(c, "ref"));
    const scores = el("div", "scores");
    scores.append(scoreRow(c, "m_full", "M_full"), scoreRow(c, "m_fg", "M_fg"), scoreRow(c, "m_bg", "M_bg"));
    const text = el("div", "text");
    const prompt = el("p", "prompt", "\\u201c" + c.prompt + "\\u201d"); prompt.title = c.prompt;
    const caption = el("p", "caption", "training caption: " + c.caption); caption.title = c.caption;
    text.append(prompt, caption, el("p", "ids", c.gen_id + "  \\u2192  " + c.ref_id));
    node.append(head, pair, scores, text);
    return node;
  }

  function visible(c) {
    if (!state.labels.has(c.label)) return false;
    if (state.method && c.method !== state.method) return false;
    if (state.cluster && String(c.cluster) !== state.cluster) return false;
    if (state.query) {
      const q = state.query;
      return (c.prompt + " " + c.caption + " " + c.gen_id + " " + c.ref_id).toLowerCase().indexOf(q) >= 0;
    }
    return true;
  }

  function render() {
    const shown = cards.filter(visible);
    const pages = Math.max(1, Math.ceil(shown.length / data.page_size));
    state.page = Math.min(state.page, pages - 1);
    const start = state.page * data.page_size;
    const nodes = shown.slice(start, start + data.page_size).map(card);
    if (!nodes.length) nodes.push(el("div", "empty", "No match passes these filters."));
    grid.replaceChildren.apply(grid, nodes);
    grid.dataset.shown = String(shown.length);
    grid.dataset.page = String(state.page);
    document.getElementById("page-info").textContent =
      "page " + (state.page + 1) + " of " + pages + " \\u00b7 " + shown.length.toLocaleString() + " matches";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages - 1;
  }

  function reset() { state.page = 0; render(); }
  document.querySelectorAll("input.f-label").forEach(function (box) {
    box.addEventListener("change", function () {
      if (box.checked) state.labels.add(box.value); else state.labels.delete(box.value);
      reset();
    });
  });
  document.getElementById("f-method").addEventListener("change", function (e) { state.method = e.target.value; reset(); });
  const cluster = document.getElementById("f-cluster");
  if (cluster) cluster.addEventListener("change", function (e) { state.cluster = e.target.value; reset(); });
  document.getElementById("f-query").addEventListener("input", function (e) { state.query = e.target.value.trim().toLowerCase(); reset(); });
  document.getElementById("f-masks").addEventListener("change", function (e) { grid.classList.toggle("hide-masks", !e.target.checked); });
  document.getElementById("prev").addEventListener("click", function () { state.page -= 1; render(); });
  document.getElementById("next").addEventListener("click", function () { state.page += 1; render(); });
  render();
})();
"""
