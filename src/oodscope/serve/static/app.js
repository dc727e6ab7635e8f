// oodscope serve: the web page. Plain script, no library; charts are inline SVG drawn here.
// It only talks to this service's API. An API key (when the service has keys) is kept in sessionStorage.
"use strict";

(function () {
  const KEY_STORE = "oodscope.apiKey";
  const SVG = "http://www.w3.org/2000/svg";
  const BATCH = 16; // images per scoring request
  const state = { models: [], model: null, card: null, view: "score", timer: null, thumbs: new Map(),
    loadingMonitor: false };

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function fmt(x, digits) {
    if (x === null || x === undefined || Number.isNaN(x)) return "–";
    const d = digits === undefined ? 4 : digits;
    const a = Math.abs(x);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(2);
    return Number(x.toPrecision(d)).toString();
  }

  const pct = (x) => (x === null || x === undefined ? "–" : (100 * x).toFixed(1) + " %");

  function clock(t) {
    const d = new Date(t * 1000);
    return d.toLocaleTimeString([], { hour12: false });
  }

  function when(t) {
    if (!t) return "–";
    const d = new Date(t * 1000);
    return d.toLocaleDateString() + " " + clock(t);
  }

  // ------------------------------------------------------------------ API
  function key() { return sessionStorage.getItem(KEY_STORE) || ""; }

  class ApiError extends Error {
    constructor(status, code, detail, retryAfter) {
      super(detail || ("HTTP " + status));
      this.status = status; this.code = code; this.retryAfter = retryAfter;
    }
  }

  async function api(path, options) {
    const opts = Object.assign({}, options || {});
    opts.headers = Object.assign({}, opts.headers || {});
    if (key()) opts.headers["Authorization"] = "Bearer " + key();
    let response;
    try {
      response = await fetch(path, opts);
    } catch (err) {
      throw new ApiError(0, "network", "the service does not answer (" + err.message + ")");
    }
    if (!response.ok) {
      let body = {};
      try { body = await response.json(); } catch (_e) { /* not JSON */ }
      const err = new ApiError(response.status, body.code || "error", body.detail || response.statusText,
        Number(response.headers.get("Retry-After")) || 0);
      if (response.status === 401 || response.status === 403) needKey(err);
      throw err;
    }
    return response;
  }

  const apiJson = async (path, options) => (await api(path, options)).json();

  function notice(text, kind) {
    const box = $("notice");
    if (!text) { box.hidden = true; box.textContent = ""; return; }
    box.hidden = false;
    box.className = "notice" + (kind ? " " + kind : "");
    box.textContent = text;
  }

  function needKey(err) {
    const msg = err.status === 401
      ? (key() ? "The API key was not accepted: " : "This service needs an API key: enter it above. ") + err.message
      : "The API key has no permission for this: " + err.message;
    notice(msg, "error");
    $("api-key").focus();
  }

  // ------------------------------------------------------------------ models
  async function loadModels() {
    try {
      const list = await apiJson("/v1/models");
      state.models = list.models;
      const select = $("model");
      select.replaceChildren(...list.models.map((m) => el("option", { value: m.name, text: m.name })));
      const wanted = state.models.some((m) => m.name === state.model) ? state.model : list.default;
      select.value = wanted;
      pickModel(wanted);
      notice("");
      return true;
    } catch (err) {
      $("model-line").textContent = "no model card: " + err.message;
      if (err.status !== 401 && err.status !== 403) notice(err.message, "error");
      return false;
    }
  }

  function pickModel(name) {
    state.model = name;
    state.card = state.models.find((m) => m.name === name) || null;
    const line = $("model-line");
    line.replaceChildren();
    if (!state.card) return;
    const s = state.card.summary || {};
    const t = s.threshold || {};
    const parts = [
      el("b", { text: state.card.name }), " · ", (s.backbone && s.backbone.id) || "backbone ?", " + ",
      s.method || "?", " · alpha = " + fmt(s.alpha, 3),
      " · threshold " + fmt(t.value), " (" + (t.n || "?") + " calibration images)",
      " · " + (s.classes ? s.classes.length : 0) + " classes",
      " · maps: " + (state.card.maps_available ? "yes" : "no"),
    ];
    line.append(...parts);
    if (state.view === "monitor") loadMonitor();
  }

  // ------------------------------------------------------------------ scoring
  function resultCard(file) {
    const url = URL.createObjectURL(file);
    const card = el("div", { class: "result pending", "data-name": file.name },
      el("div", { class: "thumbs" }, el("img", { class: "thumb", src: url, alt: file.name })),
      el("div", { class: "name", title: file.name, text: file.name }),
      el("div", { class: "body" }, el("span", { class: "verdict pending", text: "scoring ..." })));
    return card;
  }

  function fill(card, r) {
    const body = card.querySelector(".body");
    body.replaceChildren();
    card.classList.remove("pending");
    if (r.error) {
      card.classList.add("error");
      card.dataset.verdict = "error";
      body.append(el("span", { class: "verdict error", text: "not scored" }), el("div", { class: "small", text: r.error }));
      return;
    }
    const ood = !!r.ood;
    card.classList.add(ood ? "ood" : "id");
    card.dataset.verdict = ood ? "OOD" : "ID";
    const set = el("dd", { class: "set" });
    if (r.prediction_set && r.prediction_set.length) {
      for (const c of r.prediction_set) set.append(el("span", { class: "chip", text: c }));
    } else {
      set.append(el("span", { class: "muted", text: "{ } empty" + (ood ? " (flagged)" : "") }));
    }
    body.append(
      el("span", { class: "verdict " + (ood ? "ood" : "id"), text: ood ? "OOD" : "ID" }),
      el("div", { class: "explain small muted", text: ood ? "unlike the model's ID data (p-value ≤ alpha)"
        : "like the model's ID data" }),
      el("dl", { class: "facts" },
        el("dt", { text: "score" }), el("dd", { class: "score", text: fmt(r.score) }),
        el("dt", { text: "p-value" }), el("dd", { class: "p", text: fmt(r.p_value, 3) }),
        el("dt", { text: ood ? "class if ID" : "class" }), el("dd", { class: "cls",
          text: (r.predicted_class === null ? "–" : r.predicted_class) +
            (r.class_probability === null ? "" : " (" + fmt(r.class_probability, 3) + ")") }),
        el("dt", { text: "set" }), set,
        el("dt", { text: "record" }), el("dd", { class: "small", text: r.record_id === null ? "–" : "#" + r.record_id })));
    const thumbs = card.querySelector(".thumbs");
    if (r.anomaly_map && r.anomaly_map.png_base64) {
      thumbs.append(el("img", { class: "map", alt: "anomaly map", title: "anomaly map (" + fmt(r.anomaly_map.low) +
        " .. " + fmt(r.anomaly_map.high) + ")", src: "data:image/png;base64," + r.anomaly_map.png_base64 }));
    } else {
      thumbs.append(el("div", { class: "nomap", title: "this model's detector has no anomaly map", text: "no map" }));
    }
  }

  function failAll(cards, message) {
    for (const card of cards) {
      card.classList.remove("pending");
      card.classList.add("error");
      card.dataset.verdict = "error";
      card.querySelector(".body").replaceChildren(el("span", { class: "verdict error", text: "not scored" }),
        el("div", { class: "small", text: message }));
    }
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function scoreBatch(files, cards) {
    for (let attempt = 0; ; attempt++) {
      const form = new FormData();
      for (const f of files) form.append("images", f, f.name);
      const params = new URLSearchParams();
      if (state.model) params.set("model", state.model);
      if (state.card && state.card.maps_available) params.set("maps", "true");
      try {
        const answer = await apiJson("/v1/score?" + params.toString(), { method: "POST", body: form });
        answer.results.forEach((r, i) => fill(cards[i], r));
        return answer;
      } catch (err) {
        if (err.status === 503 && attempt < 3) {
          const wait = Math.min(10, err.retryAfter || 1);
          notice("The service is busy (" + err.message + "); retrying in " + wait + " s");
          await sleep(wait * 1000);
          continue;
        }
        failAll(cards, err.message);
        throw err;
      }
    }
  }

  async function scoreFiles(fileList) {
    const files = Array.from(fileList).filter((f) => f.size > 0);
    if (!files.length) return;
    const results = $("results");
    const cards = files.map(resultCard);
    results.prepend(...cards.slice().reverse());
    let flagged = 0, scored = 0, failed = 0;
    for (let i = 0; i < files.length; i += BATCH) {
      try {
        const answer = await scoreBatch(files.slice(i, i + BATCH), cards.slice(i, i + BATCH));
        flagged += answer.n_flagged; scored += answer.n_images - answer.n_errors; failed += answer.n_errors;
        if (answer.shift_alarm) notice("The shift alarm of model " + answer.model + " is raised: see Monitoring.", "error");
        else if (!$("notice").classList.contains("error")) notice("");
      } catch (err) {
        failed += Math.min(BATCH, files.length - i);
      }
    }
    $("results-summary").textContent = "last upload: " + scored + " scored, " + flagged + " flagged OOD" +
      (failed ? ", " + failed + " not scored" : "");
  }

  function setupDrop() {
    const drop = $("drop");
    const stop = (e) => { e.preventDefault(); e.stopPropagation(); };
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { stop(e); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => { stop(e); drop.classList.remove("over"); }));
    drop.addEventListener("drop", (e) => scoreFiles(e.dataTransfer.files));
    // A file dropped outside the zone must not make the browser leave the page.
    ["dragover", "drop"].forEach((t) => window.addEventListener(t, (e) => e.preventDefault()));
    $("files").addEventListener("change", (e) => { scoreFiles(e.target.files); e.target.value = ""; });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("files").click(); });
  }

  // ------------------------------------------------------------------ monitoring: charts
  function empty(container, text) {
    container.replaceChildren(el("div", { class: "empty", text }));
  }

  function rateChart(container, series, bucketSeconds, alpha) {
    if (!series || !series.length) { empty(container, "no scored image yet"); return; }
    const W = 560, H = 230, L = 44, R = 12, T = 14, B = 36;
    const t0 = series[0].start, t1 = series[series.length - 1].start + bucketSeconds;
    const span = Math.max(t1 - t0, bucketSeconds);
    const x = (t) => L + ((t - t0) / span) * (W - L - R);
    const top = Math.max(0.1, ...series.map((b) => b.ood_rate || 0), alpha || 0);
    const ymax = Math.min(1, Math.ceil(top * 10) / 10 + (top >= 0.95 ? 0 : 0.05));
    const y = (v) => T + (1 - v / ymax) * (H - T - B);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "OOD rate over time",
      class: "rate-chart" });
    for (let i = 0; i <= 4; i++) {
      const v = (ymax * i) / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, Math.round(v * 100) + "%"));
    }
    root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) }));
    const bw = Math.max(2, (bucketSeconds / span) * (W - L - R) - 2);
    const points = [];
    for (const b of series) {
      const r = b.ood_rate || 0;
      const bar = svg("rect", { class: "rate-bar", x: x(b.start) + 1, y: y(r), width: bw, height: y(0) - y(r) });
      bar.append(svg("title", {}, `${clock(b.start)}: ${b.n} image(s), ${b.flagged} flagged, ${pct(b.ood_rate)}`));
      root.append(bar);
      points.push([x(b.start + bucketSeconds / 2), y(r)]);
    }
    if (points.length > 1) {
      root.append(svg("polyline", { class: "rate", points: points.map((p) => p.join(",")).join(" ") }));
    }
    series.forEach((b, i) => {
      const dot = svg("circle", { class: "rate-dot", cx: points[i][0], cy: points[i][1], r: 3 });
      dot.append(svg("title", {}, `${clock(b.start)}: ${b.n} image(s), ${b.flagged} flagged, ${pct(b.ood_rate)}`));
      root.append(dot);
    });
    if (alpha) {
      root.append(svg("line", { class: "alpha", x1: L, x2: W - R, y1: y(alpha), y2: y(alpha) }));
      root.append(svg("text", { x: W - R, y: y(alpha) - 4, "text-anchor": "end" },
        `alpha = ${fmt(alpha, 3)}: the rate expected on ID images`));
    }
    const ticks = Math.min(6, series.length + 1);
    for (let i = 0; i < ticks; i++) {
      const t = t0 + (span * i) / Math.max(1, ticks - 1);
      root.append(svg("text", { x: x(t), y: H - B + 16, "text-anchor": i === 0 ? "start" : i === ticks - 1 ? "end" : "middle" },
        bucketSeconds >= 86400 ? new Date(t * 1000).toLocaleDateString() : clock(t)));
    }
    root.append(svg("text", { x: L, y: H - 4 },
      `bucket ${bucketLabel(bucketSeconds)} · ${series.reduce((a, b) => a + b.n, 0)} image(s) in ${series.length} bucket(s)`));
    container.replaceChildren(root);
  }

  function histChart(container, h, threshold) {
    if (!h) { empty(container, "no scores yet"); return; }
    const W = 560, H = 230, L = 44, R = 12, T = 26, B = 36;
    const lo = h.edges[0], hi = h.edges[h.edges.length - 1];
    const x = (v) => L + ((v - lo) / (hi - lo)) * (W - L - R);
    const now = h.now.map((c) => c / Math.max(1, h.n_now));
    const cal = (h.calibration || []).map((c) => c / Math.max(1, h.n_calibration));
    const top = niceTop(Math.max(0.05, ...now, ...cal));
    const y = (v) => T + (1 - v / top) * (H - T - B);
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "score histogram",
      class: "hist-chart" });
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4;
      root.append(svg("line", { class: "grid", x1: L, x2: W - R, y1: y(v), y2: y(v) }));
      root.append(svg("text", { x: L - 6, y: y(v) + 4, "text-anchor": "end" }, Math.round(v * 100) + "%"));
    }
    root.append(svg("line", { class: "axis", x1: L, x2: W - R, y1: y(0), y2: y(0) }));
    for (let i = 0; i < h.now.length; i++) {
      const x0 = x(h.edges[i]), w = x(h.edges[i + 1]) - x0;
      const half = Math.max(1, w / 2 - 1);
      if (cal.length) {
        const r = svg("rect", { class: "bar-cal", x: x0 + 1, y: y(cal[i]), width: half, height: y(0) - y(cal[i]) });
        r.append(svg("title", {}, `[${fmt(h.edges[i])}, ${fmt(h.edges[i + 1])}): calibration ${h.calibration[i]}`));
        root.append(r);
      }
      const r = svg("rect", { class: "bar-now", x: x0 + 1 + half, y: y(now[i]), width: half, height: y(0) - y(now[i]) });
      r.append(svg("title", {}, `[${fmt(h.edges[i])}, ${fmt(h.edges[i + 1])}): now ${h.now[i]}`));
      root.append(r);
    }
    if (threshold !== undefined && threshold !== null && threshold >= lo && threshold <= hi) {
      root.append(svg("line", { class: "alpha", x1: x(threshold), x2: x(threshold), y1: T - 4, y2: y(0) }));
      root.append(svg("text", { x: x(threshold) + 4, y: T + 6 }, "threshold"));
    }
    [lo, (lo + hi) / 2, hi].forEach((v, i) => root.append(svg("text", { x: x(v), y: H - B + 16,
      "text-anchor": ["start", "middle", "end"][i] }, fmt(v, 3))));
    root.append(svg("text", { x: L, y: H - 4 }, "score (higher = more OOD)" +
      (h.ks_distance !== undefined ? ` · Kolmogorov-Smirnov distance ${h.ks_distance.toFixed(3)}` : "")));
    // legend
    root.append(svg("rect", { class: "legend-now", x: L + 4, y: 6, width: 10, height: 10 }));
    root.append(svg("text", { x: L + 18, y: 15 }, `now (${h.n_now} most recent)`));
    if (cal.length) {
      root.append(svg("rect", { class: "legend-cal", x: L + 184, y: 6, width: 10, height: 10 }));
      root.append(svg("text", { x: L + 198, y: 15 }, `calibration (${h.n_calibration})`));
    }
    container.replaceChildren(root);
  }

  function niceTop(v) {
    // the smallest of 10 %, 20 %, 40 %, 60 %, 80 %, 100 % (or 5 %) that holds v: round grid lines
    return [0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1].find((t) => v <= t + 1e-9) || 1;
  }

  function bucketLabel(s) {
    if (s >= 86400) return fmt(s / 86400, 3) + " d";
    if (s >= 3600) return fmt(s / 3600, 3) + " h";
    if (s >= 60) return fmt(s / 60, 3) + " min";
    return fmt(s, 3) + " s";
  }

  function autoBucket(totals) {
    const options = [1, 10, 60, 600, 3600, 86400];
    if (!totals || !totals.first || !totals.last) return 3600;
    const span = totals.last - totals.first;
    return options.find((o) => span / o <= 30) || 86400;
  }

  // ------------------------------------------------------------------ monitoring: the view
  async function thumb(record) {
    if (state.thumbs.has(record.id)) return state.thumbs.get(record.id);
    let url = null;
    try {
      const response = await api(`/v1/records/${record.id}/image`);
      url = URL.createObjectURL(await response.blob());
    } catch (err) {
      if (err.status !== 404) return undefined; // try again next refresh
    }
    state.thumbs.set(record.id, url);
    return url;
  }

  async function renderFlagged(list) {
    const box = $("flagged");
    if (!list.length) { box.replaceChildren(el("div", { class: "muted", text: "no flagged image" })); return; }
    const items = await Promise.all(list.map(async (r) => {
      const url = await thumb(r);
      const picture = url
        ? el("img", { src: url, alt: r.item, title: r.item })
        : el("div", { class: "noimg", text: "image not kept (serve with --store-images)" });
      return el("div", { class: "flag", "data-record": r.id }, picture,
        el("div", { class: "cap", title: r.item, text: "#" + r.id + " " + r.item }),
        el("div", { class: "muted", text: "score " + fmt(r.score) }),
        el("div", { class: "muted", text: "p-value " + fmt(r.p_value, 3) }),
        el("div", { class: "muted", text: when(r.time) }));
    }));
    box.replaceChildren(...items);
  }

  function renderAlarm(a) {
    const card = $("m-alarm-card");
    card.classList.remove("raised", "quiet");
    if (!a) {
      $("m-alarm").textContent = "–";
      $("m-alarm-detail").textContent = "no test running yet";
      $("m-alarm-meter").style.width = "0";
      return;
    }
    card.classList.add(a.alarm ? "raised" : "quiet");
    $("m-alarm").textContent = a.alarm ? "RAISED" : "quiet";
    const limit = a.threshold ? Math.log10(a.threshold) : null;
    const lm = a.log10_martingale;
    $("m-alarm-detail").textContent = (lm === null || lm === undefined ? "log10 M –" : "log10 M = " + lm.toFixed(2)) +
      (limit === null ? "" : " (alarm at " + limit.toFixed(2) + ")") + " · " + (a.n_observed || 0) + " image(s), epoch " + a.epoch +
      (a.alarm && a.raised_at ? " · raised " + when(a.raised_at) : "");
    const fraction = limit && lm !== null && lm !== undefined ? Math.max(0, Math.min(1, lm / limit)) : 0;
    $("m-alarm-meter").style.width = (100 * (a.alarm ? 1 : fraction)).toFixed(1) + "%";
  }

  function renderHistory(history) {
    const box = $("alarm-history");
    if (!history.length) { box.replaceChildren(el("div", { class: "muted", text: "no alarm event" })); return; }
    const rows = history.map((e) => el("tr", {}, el("td", { text: when(e.time) }), el("td", { text: e.event }),
      el("td", { text: "epoch " + e.epoch }),
      el("td", { text: e.log10_martingale === null || e.log10_martingale === undefined ? "" :
        "log10 M = " + e.log10_martingale.toFixed(2) }),
      el("td", { text: "n = " + (e.n_observed === null ? "–" : e.n_observed) })));
    box.replaceChildren(el("table", { class: "history" }, el("tr", {}, ...["time", "event", "test", "evidence",
      "images"].map((h) => el("th", { text: h }))), ...rows));
  }

  async function fetchMonitor(bucket) {
    const params = new URLSearchParams({ bucket_seconds: String(bucket), buckets: "30" });
    if (state.model) params.set("model", state.model);
    const summary = await apiJson("/v1/monitor?" + params.toString());
    return summary;
  }

  async function loadMonitor() {
    if (state.loadingMonitor) return;
    state.loadingMonitor = true;
    try {
      const choice = $("bucket").value;
      let bucket = choice === "auto" ? (state.lastBucket || 3600) : Number(choice);
      let summary = await fetchMonitor(bucket);
      let m = summary.models.find((x) => x.name === state.model) || summary.models[0];
      if (choice === "auto" && m) {
        const better = autoBucket(m.totals);
        if (better !== bucket) {
          bucket = better;
          summary = await fetchMonitor(bucket);
          m = summary.models.find((x) => x.name === state.model) || summary.models[0];
        }
        state.lastBucket = bucket;
      }
      $("generated").textContent = "as of " + new Date().toLocaleTimeString([], { hour12: false });
      if (!m) { empty($("chart-rate"), "no model in the store"); return; }
      const t = m.totals;
      $("m-records").textContent = String(t.records);
      $("m-flagged").textContent = String(t.flagged);
      const scored = t.records - t.errors;
      $("m-rate").textContent = scored > 0 ? pct(t.flagged / scored) : "–";
      $("m-alpha").textContent = m.alpha !== null ? "expected on ID data: " + pct(m.alpha) : "";
      $("m-errors").textContent = String(t.errors);
      renderAlarm(m.alarm);
      rateChart($("chart-rate"), m.ood_rate, m.bucket_seconds, m.alpha);
      const threshold = state.card && state.card.summary && state.card.summary.threshold
        ? state.card.summary.threshold.value : null;
      histChart($("chart-hist"), m.scores, threshold);
      renderHistory(m.alarm_history || []);
      await renderFlagged(m.recent_flagged || []);
      document.body.dataset.monitorLoaded = String(Date.now());
    } catch (err) {
      if (err.status !== 401 && err.status !== 403) notice("monitoring: " + err.message, "error");
    } finally {
      state.loadingMonitor = false;
    }
  }

  // ------------------------------------------------------------------ views, key, start
  function show(view) {
    state.view = view;
    for (const b of document.querySelectorAll(".tabs button")) b.setAttribute("aria-selected", String(b.dataset.view === view));
    $("view-score").hidden = view !== "score";
    $("view-monitor").hidden = view !== "monitor";
    if (location.hash !== "#" + view) history.replaceState(null, "", "#" + view);
    clearInterval(state.timer);
    if (view === "monitor") {
      loadMonitor();
      state.timer = setInterval(() => { if ($("auto-refresh").checked) loadMonitor(); }, 5000);
    }
  }

  function setupKey() {
    $("api-key").value = key();
    $("key-form").addEventListener("submit", async (e) => {
      e.preventDefault();
      const value = $("api-key").value.trim();
      if (value) sessionStorage.setItem(KEY_STORE, value); else sessionStorage.removeItem(KEY_STORE);
      state.thumbs.clear();
      notice("");
      if (await loadModels()) notice(value ? "API key in use (kept for this browser tab only)." : "");
    });
    $("key-clear").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      $("api-key").value = "";
      state.thumbs.clear();
      notice("The API key is forgotten.");
    });
  }

  function start() {
    setupKey();
    setupDrop();
    for (const b of document.querySelectorAll(".tabs button")) b.addEventListener("click", () => show(b.dataset.view));
    $("model").addEventListener("change", (e) => pickModel(e.target.value));
    $("bucket").addEventListener("change", loadMonitor);
    $("refresh").addEventListener("click", loadMonitor);
    show(location.hash === "#monitor" ? "monitor" : "score");
    loadModels().then(() => { document.body.dataset.ready = "1"; });
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
