// lesionpipe review viewer: axial slices of post, pre and subtraction volumes on canvases,
// window/level, zoom, lesion outlines, lesion-by-lesion decisions. No external code.
(function () {
  "use strict";
  const body = document.body;
  const code = body.dataset.code;
  const kind = body.dataset.kind;          // "read" or "adjudication"
  const csrf = body.dataset.csrf;
  const api = (p) => `/api/read/${encodeURIComponent(code)}/${p}`;
  const $ = (id) => document.getElementById(id);
  const REASON_LABELS = {
    vessel: "vessel", choroid_plexus: "choroid plexus", dura_sinus: "dura / sinus",
    artefact: "artefact", not_enhancing: "not enhancing", other: "other",
  };
  const COLORS = {
    confirm: [60, 220, 90], reject: [235, 60, 60], none: [255, 215, 0],
    added: [0, 210, 255], preview: [255, 0, 255], selected: [255, 140, 0],
  };

  let meta = null, state = null;
  const vols = {};                 // kind -> {data: Int16Array, scale, lo, hi, label}
  let labels = null;               // Int16Array of automated lesion ids
  let addedVol = null;             // Int32Array: index+1 into addedList
  let addedList = [];
  let nx = 0, ny = 0, nz = 0;
  const view = { k: 0, zoom: 1, cx: 0, cy: 0, outlines: true };
  let preview = null;              // {set: Set(idx), seed: [i,j,k], info}
  let selectedKey = null;
  let lesionOrder = [];
  const panels = [];
  const storeKey = `lp-view-${code}`;

  function message(text, isError) {
    const m = $("message");
    m.textContent = text || "";
    m.className = isError ? "error" : "ok";
  }

  async function request(method, path, payload) {
    const opts = { method, headers: { "X-CSRF-Token": csrf }, credentials: "same-origin" };
    if (payload !== undefined) {
      opts.headers["Content-Type"] = "application/json";
      opts.body = JSON.stringify(payload);
    }
    const resp = await fetch(api(path), opts);
    if (resp.status === 401) { window.location = "/login"; throw new Error("not logged in"); }
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(data.error || `request failed (${resp.status})`);
    return data;
  }

  function correctionReason() {
    return state && state.signed ? $("correction").value.trim() : "";
  }

  async function post(path, payload) {
    const reason = correctionReason();
    if (state && state.signed && !reason) {
      $("correctionbox").hidden = false;
      $("correction").focus();
      throw new Error("This read is signed. Enter a correction reason first.");
    }
    if (reason) payload.correction_reason = reason;
    return request("POST", path, payload);
  }

  // ---------------------------------------------------------------- volumes and drawing
  async function loadVolume(k) {
    const resp = await fetch(api(`volume/${k}`), { credentials: "same-origin" });
    if (!resp.ok) throw new Error(`cannot load the ${k} volume (${resp.status})`);
    return new Int16Array(await resp.arrayBuffer());
  }

  function idx(i, j, k) { return i + nx * (j + ny * k); }

  function buildAddedVolume() {
    addedVol = new Int32Array(nx * ny * nz);
    addedList = [];
    const lists = [state.added || []];
    if (state.reader_added) lists.push(state.reader_added);
    for (const list of lists) {
      for (const a of list) {
        if (a.decision === "reject") continue;
        addedList.push(a);
        const n = addedList.length;
        for (const v of a.display_voxels) {
          if (v[0] >= 0 && v[0] < nx && v[1] >= 0 && v[1] < ny && v[2] >= 0 && v[2] < nz) {
            addedVol[idx(v[0], v[1], v[2])] = n;
          }
        }
      }
    }
  }

  function decisionOf(key) {
    if (state.kind === "adjudication") {
      const row = (state.rows || []).find((r) => r.key === key);
      if (row) return row.final;
    }
    const l = state.lesions.find((x) => x.key === key) || (state.added || []).find((x) => x.key === key);
    return l ? l.decision : null;
  }

  function colorFor(key, isAdded) {
    if (key === selectedKey) return COLORS.selected;
    const d = decisionOf(key);
    if (d === "confirm") return isAdded ? COLORS.added : COLORS.confirm;
    if (d === "reject") return COLORS.reject;
    return isAdded ? COLORS.added : COLORS.none;
  }

  function makePanel(volKind, title) {
    const wrap = document.createElement("div");
    wrap.className = "panel";
    const cap = document.createElement("div");
    cap.className = "caption";
    cap.textContent = title;
    const canvas = document.createElement("canvas");
    canvas.width = 340; canvas.height = 340;
    canvas.id = `canvas-${volKind}`;
    const wl = document.createElement("div");
    wl.className = "wl small";
    wrap.append(cap, canvas, wl);
    $("panels").append(wrap);
    const off = document.createElement("canvas");
    off.width = nx; off.height = ny;
    const p = { kind: volKind, canvas, off, wl, geom: null };
    attachMouse(p);
    panels.push(p);
  }

  function geometry(p) {
    const W = p.canvas.width, H = p.canvas.height;
    const sx = meta.spacing[0], sy = meta.spacing[1];
    const s0 = Math.min(W / (nx * sx), H / (ny * sy));
    const px = s0 * sx * view.zoom, py = s0 * sy * view.zoom;
    return { W, H, px, py, dx: W / 2 - view.cx * px, dy: H / 2 - view.cy * py };
  }

  function drawPanel(p) {
    const v = vols[p.kind];
    const ctx = p.off.getContext("2d");
    const img = ctx.createImageData(nx, ny);
    const out = img.data;
    const k = view.k;
    const lo = v.lo, hi = v.hi, span = Math.max(hi - lo, 1e-6), sc = v.scale;
    const colorCache = new Map();
    const col = (key, added) => {
      const c = key + (added ? "+" : "");
      if (!colorCache.has(c)) colorCache.set(c, colorFor(key, added));
      return colorCache.get(c);
    };
    for (let r = 0; r < ny; r++) {
      const j = ny - 1 - r;
      for (let c = 0; c < nx; c++) {
        const i = nx - 1 - c;
        const q = idx(i, j, k);
        let g = ((v.data[q] * sc - lo) / span) * 255;
        g = g < 0 ? 0 : g > 255 ? 255 : g;
        let R = g, G = g, B = g;
        if (view.outlines) {
          const L = labels[q], A = addedVol[q];
          if (L > 0 && isEdge(labels, i, j, k, L)) {
            [R, G, B] = col(`auto:${L}`, false);
          } else if (A > 0 && isEdge(addedVol, i, j, k, A)) {
            [R, G, B] = col(addedList[A - 1].key, true);
          }
        }
        if (preview && preview.set.has(q)) {
          R = 0.45 * R + 0.55 * COLORS.preview[0];
          G = 0.45 * G + 0.55 * COLORS.preview[1];
          B = 0.45 * B + 0.55 * COLORS.preview[2];
        }
        const o = 4 * (r * nx + c);
        out[o] = R; out[o + 1] = G; out[o + 2] = B; out[o + 3] = 255;
      }
    }
    ctx.putImageData(img, 0, 0);
    const vc = p.canvas.getContext("2d");
    const geom = geometry(p);
    p.geom = geom;
    vc.fillStyle = "#000";
    vc.fillRect(0, 0, geom.W, geom.H);
    vc.imageSmoothingEnabled = false;
    vc.drawImage(p.off, geom.dx, geom.dy, nx * geom.px, ny * geom.py);
    vc.fillStyle = "#ffd54f";
    vc.font = "13px sans-serif";
    vc.fillText("R", 6, geom.H / 2);
    vc.fillText("L", geom.W - 14, geom.H / 2);
    vc.fillText("A", geom.W / 2, 14);
    vc.fillText("P", geom.W / 2, geom.H - 6);
    p.wl.textContent = `window ${fmt(v.lo)} .. ${fmt(v.hi)}`;
  }

  function fmt(x) { return Math.abs(x) >= 100 ? x.toFixed(0) : x.toFixed(1); }

  function isEdge(vol, i, j, k, L) {
    return (i === 0 || vol[idx(i - 1, j, k)] !== L) || (i === nx - 1 || vol[idx(i + 1, j, k)] !== L) ||
      (j === 0 || vol[idx(i, j - 1, k)] !== L) || (j === ny - 1 || vol[idx(i, j + 1, k)] !== L);
  }

  let pending = false;
  function draw() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      for (const p of panels) drawPanel(p);
      $("slice").value = view.k;
      $("slicelabel").textContent = `${view.k + 1} / ${nz}`;
      sessionStorage.setItem(storeKey, JSON.stringify(view));
    });
  }

  function setSlice(k) { view.k = Math.max(0, Math.min(nz - 1, Math.round(k))); draw(); }
  function setZoom(z) {
    view.zoom = Math.max(1, Math.min(16, z));
    if (view.zoom === 1) { view.cx = nx / 2; view.cy = ny / 2; }   // whole slice in view
    draw();
  }

  function attachMouse(p) {
    let drag = null;
    p.canvas.addEventListener("wheel", (e) => {
      e.preventDefault();
      if (e.ctrlKey) setZoom(view.zoom * (e.deltaY < 0 ? 1.25 : 0.8));
      else setSlice(view.k + (e.deltaY < 0 ? 1 : -1));
    }, { passive: false });
    p.canvas.addEventListener("mousedown", (e) => {
      drag = { x: e.clientX, y: e.clientY, moved: false, lo: vols[p.kind].lo, hi: vols[p.kind].hi,
               cx: view.cx, cy: view.cy, shift: e.shiftKey };
    });
    window.addEventListener("mousemove", (e) => {
      if (!drag) return;
      const ddx = e.clientX - drag.x, ddy = e.clientY - drag.y;
      if (Math.abs(ddx) + Math.abs(ddy) > 3) drag.moved = true;
      if (!drag.moved) return;
      if (drag.shift) {
        const g = p.geom;
        view.cx = drag.cx - ddx / g.px; view.cy = drag.cy - ddy / g.py;
      } else {
        const v = vols[p.kind];
        const width0 = drag.hi - drag.lo, level0 = (drag.hi + drag.lo) / 2;
        const width = Math.max(width0 * Math.exp(ddx / 200), 1e-3);
        const level = level0 - (ddy / 200) * width0;
        v.lo = level - width / 2; v.hi = level + width / 2;
      }
      draw();
    });
    window.addEventListener("mouseup", (e) => {
      if (!drag) return;
      const wasClick = !drag.moved;
      drag = null;
      if (wasClick && e.target === p.canvas && $("addmode").checked) clickGrow(p, e);
    });
  }

  function canvasToVoxel(p, e) {
    const rect = p.canvas.getBoundingClientRect();
    const x = (e.clientX - rect.left) * (p.canvas.width / rect.width);
    const y = (e.clientY - rect.top) * (p.canvas.height / rect.height);
    const g = p.geom;
    const c = Math.floor((x - g.dx) / g.px), r = Math.floor((y - g.dy) / g.py);
    if (c < 0 || c >= nx || r < 0 || r >= ny) return null;
    return [nx - 1 - c, ny - 1 - r, view.k];
  }

  async function clickGrow(p, e) {
    const vox = canvasToVoxel(p, e);
    if (!vox) return;
    try {
      const res = await request("POST", "grow", { seed: vox });
      const set = new Set(res.display_voxels.map((v) => idx(v[0], v[1], v[2])));
      preview = { set, seed: vox };
      $("addinfo").textContent = `Grown region: ${res.n_voxels} voxels, ${res.volume_mm3} mm\u00b3. Add it as a lesion?`;
      $("addbox").hidden = false;
      message("");
      draw();
    } catch (err) { message(err.message, true); }
  }

  // ---------------------------------------------------------------- lesion table
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function decisionCell(key, current) {
    const td = el("td", { class: "decide" });
    const ok = el("button", { class: "confirm", title: "Confirm (c)" }, "\u2713");
    const select = el("select", { class: "reason" });
    select.append(el("option", { value: "" }, "reason\u2026"));
    for (const r of state.reject_reasons) select.append(el("option", { value: r }, REASON_LABELS[r] || r));
    const note = el("input", { class: "note", placeholder: "why?", maxlength: "300" });
    note.hidden = true;
    select.addEventListener("change", () => { note.hidden = select.value !== "other"; });
    const no = el("button", { class: "reject", title: "Reject with the chosen reason" }, "\u2717 Reject");
    if (current && current.decision === "reject") {
      select.value = current.reason; note.value = current.note || ""; note.hidden = current.reason !== "other";
    }
    ok.addEventListener("click", (ev) => { ev.stopPropagation(); decide(key, "confirm", "", ""); });
    no.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (!select.value) { message("Choose a rejection reason first.", true); select.focus(); return; }
      decide(key, "reject", select.value, note.value);
    });
    for (const x of [select, note]) x.addEventListener("click", (ev) => ev.stopPropagation());
    td.append(ok, select, note, no);
    return td;
  }

  function badge(decision, reason) {
    if (!decision) return el("span", { class: "badge none" }, "\u2014");
    const text = decision === "confirm" ? "confirmed" : `rejected${reason ? ": " + (REASON_LABELS[reason] || reason) : ""}`;
    return el("span", { class: `badge ${decision}` }, text);
  }

  function renderTable() {
    const thead = $("lesiontable").tHead, tbody = $("lesiontable").tBodies[0];
    thead.innerHTML = ""; tbody.innerHTML = "";
    lesionOrder = [];
    const adj = state.kind === "adjudication";
    const hr = el("tr");
    const heads = adj ? ["#", "mm\u00b3", "Reader 1", "Reader 2", "Final", "Decide"]
                      : ["#", "mm\u00b3", "peak %", "Decision", "Decide"];
    for (const h of heads) hr.append(el("th", {}, h));
    thead.append(hr);
    const byKey = {};
    for (const l of state.lesions) byKey[l.key] = l;
    for (const a of (state.added || []).concat(state.reader_added || [])) byKey[a.key] = a;
    const rows = [];
    if (adj) {
      for (const r of state.rows) rows.push({ key: r.key, row: r, item: byKey[r.key] });
      for (const a of state.added) rows.push({ key: a.key, row: null, item: a, own: true });
    } else {
      for (const l of state.lesions) rows.push({ key: l.key, item: l });
      for (const a of state.added) rows.push({ key: a.key, item: a });
    }
    for (const { key, row, item, own } of rows) {
      const tr = el("tr", { id: `row-${key.replace(":", "-")}`, "data-key": key });
      if (key === selectedKey) tr.classList.add("selected");
      const label = key.startsWith("auto:") ? key.slice(5) : `+${key.slice(6)}`;
      tr.append(el("td", {}, label));
      tr.append(el("td", {}, item ? String(Math.round(item.volume_mm3)) : ""));
      if (adj) {
        if (row) {
          const r1 = el("td"); r1.append(badge(row.r1, row.r1_reason)); tr.append(r1);
          const r2 = el("td"); r2.append(badge(row.r2, row.r2_reason)); tr.append(r2);
          const f = el("td"); f.append(badge(row.final, "")); tr.append(f);
          if (!row.agree) tr.classList.add("disputed");
        } else {
          tr.append(el("td", {}, "\u2014"), el("td", {}, "\u2014"));
          const f = el("td"); f.append(badge(item.decision, item.reason)); tr.append(f);
        }
        tr.append(decisionCell(key, row ? null : item));
      } else {
        tr.append(el("td", {}, item.peak_enhancement_pct !== undefined ? String(Math.round(item.peak_enhancement_pct)) : "added"));
        const d = el("td"); d.append(badge(item.decision, item.reason)); tr.append(d);
        tr.append(decisionCell(key, item));
      }
      tr.addEventListener("click", () => jumpTo(key));
      tbody.append(tr);
      lesionOrder.push(key);
    }
    const undecided = state.undecided.length;
    $("counts").textContent = adj
      ? `Reader counts ${state.reader_counts[0]} / ${state.reader_counts[1]}; ${undecided} disputed left`
      : `${state.confirmed_count} confirmed, ${undecided} undecided`;
  }

  function centroidOf(key) {
    const all = state.lesions.concat(state.added || [], state.reader_added || []);
    const l = all.find((x) => x.key === key);
    return l ? l.display_centroid : null;
  }

  function jumpTo(key) {
    const c = centroidOf(key);
    selectedKey = key;
    if (c) {
      view.k = Math.round(c[2]);
      view.zoom = Math.max(view.zoom, 2);
      view.cx = nx - 1 - c[0] + 0.5;
      view.cy = ny - 1 - c[1] + 0.5;
    }
    renderTable();
    draw();
  }

  function step(delta) {
    if (!lesionOrder.length) return;
    const i = lesionOrder.indexOf(selectedKey);
    const n = i < 0 ? (delta > 0 ? 0 : lesionOrder.length - 1)
                    : (i + delta + lesionOrder.length) % lesionOrder.length;
    jumpTo(lesionOrder[n]);
  }

  // ---------------------------------------------------------------- actions
  async function decide(key, decision, reason, note) {
    try {
      await post("decision", { lesion: key, decision, reason, note });
      message(`Saved: lesion ${key.replace("auto:", "")} ${decision === "confirm" ? "confirmed" : "rejected"}.`);
      await refresh();
    } catch (err) { message(err.message, true); }
  }

  async function refresh() {
    state = await request("GET", "state");
    buildAddedVolume();
    renderTable();
    renderSide();
    draw();
  }

  function renderSide() {
    const st = $("status");
    const unsignedCorrection = !state.signed && state.signatures.length > 0;
    st.textContent = state.signed ? "Signed (locked)" : unsignedCorrection ? "Corrected, needs a new signature" : "Not signed";
    st.className = "status " + (state.signed ? "signed" : "open");
    $("correctionbox").hidden = !state.signed;
    $("meaning").textContent = state.meaning;
    const sigs = $("signatures");
    sigs.innerHTML = "";
    for (const s of state.signatures) {
      sigs.append(el("p", { class: "signature" }, `Signed by ${s.signer_name} at ${s.signed_utc} UTC`));
    }
    const ul = $("comments");
    ul.innerHTML = "";
    for (const c of state.comments) ul.append(el("li", {}, `${c.utc.slice(0, 16)} \u2014 ${c.text}`));
    if (state.reader_comments) {
      for (const [who, list] of Object.entries(state.reader_comments)) {
        for (const t of list) ul.append(el("li", { class: "other" }, `${who}: ${t}`));
      }
    }
    const h = $("history");
    h.innerHTML = "";
    for (const d of state.history) {
      h.append(el("li", {}, `${d.utc.slice(11, 19)} ${d.lesion} ${d.decision}${d.reason ? " (" + d.reason + ")" : ""}${d.correction_reason ? " \u2014 correction: " + d.correction_reason : ""}`));
    }
  }

  async function main() {
    try {
      meta = await request("GET", "meta");
      [nx, ny, nz] = meta.shape;
      labels = await loadVolume("labels");
      for (const v of meta.volumes) {
        if (v.kind === "enh" && meta.volumes.some((x) => x.kind === "sub")) continue;
        vols[v.kind] = { data: await loadVolume(v.kind), scale: v.scale, lo: v.window[0], hi: v.window[1],
                         lo0: v.window[0], hi0: v.window[1], label: v.label };
        makePanel(v.kind, v.label);
      }
      view.k = Math.floor(nz / 2); view.cx = nx / 2; view.cy = ny / 2;
      const saved = JSON.parse(sessionStorage.getItem(storeKey) || "null");
      if (saved) Object.assign(view, saved);
      $("slice").max = nz - 1;
      $("outlines").checked = view.outlines;
      $("commenttext").value = sessionStorage.getItem(storeKey + "-comment") || "";
      await refresh();
      body.classList.add("ready");
    } catch (err) { message(err.message, true); }
  }

  $("slice").addEventListener("input", (e) => setSlice(+e.target.value));
  $("zoomin").addEventListener("click", () => setZoom(view.zoom * 1.5));
  $("zoomout").addEventListener("click", () => setZoom(view.zoom / 1.5));
  $("zoomreset").addEventListener("click", () => {
    view.zoom = 1; view.cx = nx / 2; view.cy = ny / 2;
    for (const v of Object.values(vols)) { v.lo = v.lo0; v.hi = v.hi0; }
    draw();
  });
  $("outlines").addEventListener("change", (e) => { view.outlines = e.target.checked; draw(); });
  $("nextlesion").addEventListener("click", () => step(1));
  $("prevlesion").addEventListener("click", () => step(-1));
  $("addaccept").addEventListener("click", async () => {
    if (!preview) return;
    try {
      const res = await post("add", { seed: preview.seed });
      preview = null;
      $("addbox").hidden = true;
      message(`Added lesion +${res.added_id} (${res.n_voxels} voxels).`);
      await refresh();
    } catch (err) { message(err.message, true); }
  });
  $("adddiscard").addEventListener("click", () => { preview = null; $("addbox").hidden = true; draw(); });
  $("commenttext").addEventListener("input", (e) => sessionStorage.setItem(storeKey + "-comment", e.target.value));
  $("commentsave").addEventListener("click", async () => {
    const text = $("commenttext").value.trim();
    if (!text) return;
    try {
      await post("comment", { text });
      $("commenttext").value = "";
      sessionStorage.removeItem(storeKey + "-comment");
      message("Comment saved.");
      await refresh();
    } catch (err) { message(err.message, true); }
  });
  $("sign").addEventListener("click", async () => {
    try {
      const res = await request("POST", "sign", { password: $("signpassword").value });
      $("signpassword").value = "";
      $("correction").value = "";
      message(`Signed by ${res.signer_name} at ${res.signed_utc} UTC.`);
      await refresh();
    } catch (err) { message(err.message, true); }
  });
  document.addEventListener("keydown", (e) => {
    if (["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName)) return;
    if (e.key === "ArrowUp" || e.key === "PageUp") { setSlice(view.k + 1); e.preventDefault(); }
    else if (e.key === "ArrowDown" || e.key === "PageDown") { setSlice(view.k - 1); e.preventDefault(); }
    else if (e.key === "n") step(1);
    else if (e.key === "p") step(-1);
    else if (e.key === "o") { view.outlines = !view.outlines; $("outlines").checked = view.outlines; draw(); }
    else if (e.key === "+" || e.key === "=") setZoom(view.zoom * 1.5);
    else if (e.key === "-") setZoom(view.zoom / 1.5);
    else if (e.key === "c" && selectedKey) decide(selectedKey, "confirm", "", "");
  });
  main();
})();
