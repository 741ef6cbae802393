// The /topology page, kept current: asks /live every few seconds and updates the picture
// and the tables in place. Plain DOM calls and no framework; everything the node sends goes
// into the page as text (textContent), never as markup. Served as /topology.js so that the
// endpoint's Content-Security-Policy (script-src 'self') admits it and nothing inline.
(function () {
  "use strict";

  const body = document.body;
  const liveUrl = body.dataset.live || "/live";
  const svgUrl = body.dataset.svg || "/topology.svg";
  const pollMs = Number(body.dataset.pollMs) || 2000;
  const status = document.getElementById("live-status");
  let drawnShape = null; // the topology (JSON text) the picture shows
  let updates = 0;

  // a rate as the server writes it (router/admin/live.py per_s)
  function perS(value) {
    if (value === null || value === undefined) return "\u2013/s";
    return (value < 100 ? value.toFixed(1) : value.toFixed(0)) + "/s";
  }

  // each table body's rows as [text, class] cells: the same columns as drawing.py _cells
  const tables = {
    peers: (live) => live.peers.map((p) => [
      [p.id], [p.state], [p.encoding], [perS(p.in_per_s), "rate"],
      [perS(p.out_per_s), "rate"]]),
    traffic: (live) => {
      const s = live.stations;
      return [[[String(s.local)], [String(s.overlay)], [perS(s.up_per_s), "rate"],
               [perS(s.down_per_s), "rate"]]];
    },
    backends: (live) => live.backends.map((b) => [[b.name], [b.role], [b.target]]),
    secondaries: (live) => live.secondaries.map((c) => [
      [c.name], [c.queued + "/" + c.queue_capacity], [String(c.backlog), "backlog"],
      [perS(c.delivered_per_s), "rate"], [String(c.dropped)]]),
    decisions: (live) => live.firewall.recent.map((d) => [
      [d.ts || ""], [d.outcome || "", d.outcome || ""], [d.rule || ""], [d.action || ""],
      [d.source || ""]]),
  };

  function cell(tag, text, cls) {
    const element = document.createElement(tag);
    element.textContent = text;
    if (cls) element.className = cls;
    return element;
  }

  function fill(id, rows) {
    const tbody = document.getElementById(id);
    if (!tbody) return;
    const out = rows.map((row) => {
      const tr = document.createElement("tr");
      for (const [text, cls] of row) tr.appendChild(cell("td", String(text), cls));
      return tr;
    });
    if (out.length === 0) {
      const tr = document.createElement("tr");
      const td = cell("td", "none");
      td.colSpan = tbody.parentNode.querySelectorAll("thead th").length || 1;
      tr.appendChild(td);
      out.push(tr);
    }
    tbody.replaceChildren(...out);
  }

  function labelRates(live) {
    const byPeer = new Map(live.peers.map(
      (p) => [p.id, "in " + perS(p.in_per_s) + ", out " + perS(p.out_per_s)]));
    for (const text of document.querySelectorAll("#picture text.rate")) {
      text.textContent = byPeer.get(text.getAttribute("data-peer")) || "";
    }
  }

  function summary(topology) {
    const stations = topology.nodes.reduce((sum, n) => sum + n.stations, 0);
    return topology.nodes.length + " node(s), " + stations + " station(s), " +
      topology.edges.length + " link(s) known";
  }

  // the picture itself is drawn by the node: fetch it again when the topology changed
  async function redraw() {
    const reply = await fetch(svgUrl, { cache: "no-store" });
    if (!reply.ok) throw new Error(svgUrl + ": HTTP " + reply.status);
    const parsed = new DOMParser().parseFromString(await reply.text(), "image/svg+xml");
    const svg = parsed.documentElement;
    if (svg.localName !== "svg" || svg.namespaceURI !== "http://www.w3.org/2000/svg") {
      throw new Error(svgUrl + ": not an SVG drawing");
    }
    document.getElementById("picture").replaceChildren(document.importNode(svg, true));
  }

  async function poll() {
    try {
      const reply = await fetch(liveUrl, { cache: "no-store" });
      if (!reply.ok) throw new Error(liveUrl + ": HTTP " + reply.status);
      const live = await reply.json();
      const shape = JSON.stringify(live.topology);
      if (shape !== drawnShape) {
        await redraw();
        drawnShape = shape;
      }
      labelRates(live);
      for (const id of Object.keys(tables)) fill(id, tables[id](live));
      document.getElementById("summary").textContent = summary(live.topology);
      updates += 1;
      const span = live.rate_window_s === null ? "" :
        "; rates over the last " + Math.round(live.rate_window_s) + " s";
      status.className = "sub";
      status.dataset.updates = String(updates);
      status.textContent = "live: updated " + live.time + span + "; asks every " +
        pollMs / 1000 + " s";
    } catch (err) {
      status.className = "sub stale";
      status.textContent = "live updates paused: " + err.message + "; trying again";
    }
    setTimeout(poll, pollMs);
  }

  poll();
})();
