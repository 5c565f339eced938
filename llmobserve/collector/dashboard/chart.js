/* Stacked bar chart as plain SVG (no library): one bar per time bucket,
 * one colour per series, a title per segment for hover, a few axis labels.
 * window.StackedBars.draw(element, {starts, bucket, series: [{name, values}]}, format, axisFormat)
 */
"use strict";
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2f6fde", "#f79009", "#12b76a", "#9e77ed", "#f04438", "#0ba5ec",
    "#ee46bc", "#667085", "#98a2b3"];
  const H = 240, LEFT = 70, RIGHT = 8, TOP = 8, BOTTOM = 26;

  function el(name, attrs, text) {
    const node = document.createElementNS(NS, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function timeLabel(ts, bucket, days) {
    const d = new Date(ts * 1000);
    const pad = (n) => String(n).padStart(2, "0");
    const day = `${d.getMonth() + 1}/${d.getDate()}`;
    const clock = `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return bucket >= 86400 ? day : days ? `${day} ${clock}` : clock;
  }

  function draw(target, data, format, axisFormat) {
    // drawn at the element's own width, so labels keep their size on a phone
    const W = Math.max(320, Math.round(target.clientWidth || 800));
    const tick = axisFormat || format;
    const n = data.starts.length;
    const days = n > 1 && data.starts[n - 1] - data.starts[0] >= 86400;
    const totals = new Array(n).fill(0);
    for (const s of data.series) s.values.forEach((v, i) => { totals[i] += v; });
    const top = niceMax(Math.max(0, ...totals));
    const ticks = [0, 1, 2, 3, 4].map((t) => tick((top * t) / 4));
    // room for the longest axis label ("$0.0000037"), about 7 px a character at 11 px
    const left = Math.max(LEFT, 10 + 7 * Math.max(...ticks.map((s) => String(s).length)));
    const svg = el("svg", { viewBox: `0 0 ${W} ${H}`, role: "img",
      "aria-label": "stacked bars over time" });
    const plotW = W - left - RIGHT, plotH = H - TOP - BOTTOM;
    const y = (v) => TOP + plotH - (v / top) * plotH;
    for (let t = 0; t <= 4; t++) {
      const v = (top * t) / 4;
      svg.appendChild(el("line", { x1: left, x2: W - RIGHT, y1: y(v), y2: y(v),
        stroke: "#e4e7ec", "stroke-width": 1 }));
      svg.appendChild(el("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end",
        "font-size": 11, fill: "#667085" }, ticks[t]));
    }
    const step = plotW / Math.max(n, 1);
    const barW = Math.max(1, step * 0.8);
    const base = new Array(n).fill(0);
    data.series.forEach((s, k) => {
      const color = COLORS[k % COLORS.length];
      s.values.forEach((v, i) => {
        if (!(v > 0)) return;
        const y0 = y(base[i]), y1 = y(base[i] + v);
        base[i] += v;
        const rect = el("rect", { x: left + i * step + (step - barW) / 2, y: y1,
          width: barW, height: Math.max(0.5, y0 - y1), fill: color, "data-series": s.name });
        rect.appendChild(el("title", {}, `${s.name} ${timeLabel(data.starts[i], data.bucket, true)}: ${format(v)}`));
        svg.appendChild(rect);
      });
    });
    const every = Math.max(1, Math.ceil(n / Math.max(2, Math.floor(plotW / (days ? 110 : 70)))));
    const room = days ? 40 : 20; // half a label: none cut at the right edge
    for (let i = 0; i < n && left + i * step + step / 2 + room <= W; i += every) {
      svg.appendChild(el("text", { x: left + i * step + step / 2, y: H - 8, "text-anchor": "middle",
        "font-size": 11, fill: "#667085" }, timeLabel(data.starts[i], data.bucket, days)));
    }
    const legend = document.createElement("div");
    legend.className = "legend";
    data.series.forEach((s, k) => {
      const item = document.createElement("span");
      const swatch = document.createElement("i");
      swatch.style.background = COLORS[k % COLORS.length];
      item.append(swatch, s.name);
      legend.appendChild(item);
    });
    target.replaceChildren(svg, legend);
  }

  window.StackedBars = { draw };
})();
