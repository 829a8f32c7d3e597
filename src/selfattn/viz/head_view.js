// The head view page's script: reads the JSON in #hv-data, draws the token columns and the
// lines between them, and answers hover and click. head_view.py inlines it into each page.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("hv-data").textContent);
  const NS = "http://www.w3.org/2000/svg";  // the SVG namespace name, not a fetched address
  const LH = 20, TOP = 44, GAP = 260, PADX = 12;
  const svg = document.getElementById("hv-svg");
  const detail = document.getElementById("detail");
  const layerSel = document.getElementById("layer");
  const headBox = document.getElementById("heads");
  const rowOf = new Map(D.rows.map((q, r) => [q, r]));  // query position -> row in weights
  const state = { layer: 0, heads: new Set(D.heads.map((_, i) => i)), focus: null, pinned: null };

  function el(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  function short(t) { return t.length > 18 ? t.slice(0, 17) + "\u2026" : t; }

  // Token columns: queries on the left, keys on the right.
  const width = D.textWidth * 2 + GAP + 2 * PADX;
  const n = Math.max(D.query_tokens.length, D.tokens.length);
  svg.setAttribute("width", width);
  svg.setAttribute("height", TOP + n * LH + 8);
  el("text", { x: PADX + D.textWidth, y: 16, "text-anchor": "end", fill: "#666" }, svg)
    .textContent = "query";
  el("text", { x: PADX + D.textWidth + GAP, y: 16, fill: "#666" }, svg).textContent = "key";
  const lines = el("g", { id: "lines" }, svg);
  const xL = PADX + D.textWidth, xR = xL + GAP;
  const qNodes = D.query_tokens.map((t, i) => {
    const g = el("g", { class: "tok query " + (rowOf.has(i) ? "active" : "inactive"),
                        "data-pos": i }, svg);
    el("rect", { x: PADX, y: TOP + i * LH - 14, width: D.textWidth + 4, height: LH - 2, rx: 3 }, g);
    el("text", { x: xL - 4, y: TOP + i * LH, "text-anchor": "end" }, g).textContent = short(t);
    if (rowOf.has(i)) {
      g.addEventListener("mouseenter", () => { state.focus = { row: rowOf.get(i) }; render(); });
      g.addEventListener("mouseleave", () => { state.focus = null; render(); });
      g.addEventListener("click", () => {
        state.pinned = state.pinned && state.pinned.row === rowOf.get(i) ? null
                                                                        : { row: rowOf.get(i) };
        render();
      });
    }
    return g;
  });
  const kNodes = D.tokens.map((t, j) => {
    const g = el("g", { class: "tok key active", "data-pos": j }, svg);
    el("rect", { x: xR, y: TOP + j * LH - 14, width: D.textWidth + 4, height: LH - 2, rx: 3,
                 "fill-opacity": 0 }, g);
    el("text", { x: xR + 4, y: TOP + j * LH }, g).textContent = short(t);
    g.addEventListener("mouseenter", () => { state.focus = { key: j }; render(); });
    g.addEventListener("mouseleave", () => { state.focus = null; render(); });
    return g;
  });

  // Controls: the layer and the heads.
  D.layers.forEach((l, i) => {
    const o = document.createElement("option");
    o.value = i; o.textContent = "layer " + l; layerSel.appendChild(o);
  });
  layerSel.addEventListener("change", () => { state.layer = +layerSel.value; render(); });
  D.heads.forEach((h, i) => {
    const lab = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox"; box.checked = true; box.dataset.head = i;
    box.addEventListener("change", () => {
      if (box.checked) state.heads.add(i); else state.heads.delete(i);
      render();
    });
    const sw = document.createElement("span");
    sw.className = "swatch"; sw.style.background = D.colors[i % D.colors.length];
    lab.append(box, sw, document.createTextNode(String(h)));
    headBox.appendChild(lab);
  });

  function fmt(p) { return p.toFixed(3); }

  function render() {
    const W = D.weights[state.layer];  // [head][row][key]
    const focus = state.pinned || state.focus;
    const heads = [...state.heads].sort((a, b) => a - b);
    lines.replaceChildren();
    let drawn = 0;
    const rows = focus && focus.row !== undefined ? [focus.row] : D.rows.map((_, r) => r);
    const onlyKey = focus && focus.key !== undefined ? focus.key : null;
    const faint = !focus;  // every row at once: thinner lines so the picture stays readable
    const keyMass = new Float64Array(D.tokens.length);
    heads.forEach((h, hi) => {
      const color = D.colors[h % D.colors.length];
      // heads fan out by a pixel or two at each end, so lines to the same key stay visible
      const dy = (hi - (heads.length - 1) / 2) * Math.min(2.5, 12 / heads.length);
      for (const r of rows) {
        const yq = TOP + D.rows[r] * LH - 4;
        for (let j = 0; j < D.tokens.length; j++) {
          if (onlyKey !== null && j !== onlyKey) continue;
          const p = W[h][r][j];
          if (focus && focus.row !== undefined) keyMass[j] += p / heads.length;
          if (p < (faint ? 0.02 : 0.005)) continue;
          el("line", { x1: xL + 6, y1: yq + dy, x2: xR - 2, y2: TOP + j * LH - 4 + dy,
                       stroke: color,
                       "stroke-width": faint ? 1 : 1 + 3 * p,
                       "stroke-opacity": (faint ? 0.5 : 1) * p,
                       "data-head": D.heads[h], "data-row": D.rows[r], "data-key": j,
                       "data-p": p }, lines);
          drawn++;
        }
      }
    });
    svg.dataset.lines = drawn;
    qNodes.forEach((g, i) => g.classList.toggle("focus",
      !!focus && focus.row !== undefined && D.rows[focus.row] === i));
    kNodes.forEach((g, j) => {
      const r = g.querySelector("rect");
      r.setAttribute("fill-opacity", focus && focus.row !== undefined ? keyMass[j] * 0.6 : 0);
      g.classList.toggle("focus", !!focus && focus.key === j);
    });
    detail.textContent = describe(W, heads, focus);
  }

  function describe(W, heads, focus) {
    if (!focus) {
      return "Hover a query token (left) to see the keys it reads; " +
             "hover a key to see who reads it.";
    }
    const out = [];
    if (focus.row !== undefined) {
      const q = D.rows[focus.row];
      out.push("query " + q + " \"" + D.query_tokens[q] + "\" (layer " +
               D.layers[state.layer] + ")");
      for (const h of heads) {
        const ps = W[h][focus.row].map((p, j) => [p, j]).sort((a, b) => b[0] - a[0]).slice(0, 3);
        out.push("  head " + D.heads[h] + ": " +
                 ps.map(([p, j]) => D.tokens[j] + " " + fmt(p)).join(", "));
      }
    } else {
      out.push("key " + focus.key + " \"" + D.tokens[focus.key] + "\" (layer " +
               D.layers[state.layer] + ")");
      for (const h of heads) {
        let best = -1, who = -1;
        D.rows.forEach((_, r) => {
          if (W[h][r][focus.key] > best) { best = W[h][r][focus.key]; who = r; }
        });
        out.push("  head " + D.heads[h] + ": read most by " + D.query_tokens[D.rows[who]] +
                 " " + fmt(best));
      }
    }
    return out.join("\n");
  }

  window.selfattnHeadView = { data: D, state: state, render: render };
  render();
})();
