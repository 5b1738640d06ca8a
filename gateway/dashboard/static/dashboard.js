// swarmgate dashboard: polls GET /v1/swarm and draws, per model, each server's span over the
// model's blocks, the servers' load and round trips, per-block coverage, and the banned peers.
// Every string from the swarm (peer ids, model names, ban reasons) is written as text, never as
// HTML: records are written by arbitrary peers.
"use strict";

const POLL_MS = 2000;
const KEY_ITEM = "swarmgate.dashboard.key";
const SWARM_URL = "v1/swarm"; // relative: the page works behind a proxy that adds a path prefix

// -- the API key: ?key= (then removed from the address bar), or the form; kept in localStorage --
function takeKeyFromAddress() {
  const url = new URL(window.location.href);
  if (!url.searchParams.has("key")) return;
  saveKey(url.searchParams.get("key"));
  url.searchParams.delete("key");
  window.history.replaceState(null, "", url.pathname + url.search + url.hash);
}

function saveKey(key) {
  if (key) window.localStorage.setItem(KEY_ITEM, key);
  else window.localStorage.removeItem(KEY_ITEM);
}

// -- polling: one request at a time, the next POLL_MS after the last answer --
let timer = null;
let polling = false;
let again = false;

async function poll() {
  window.clearTimeout(timer);
  if (polling) {
    again = true; // the key changed mid-request: ask again as soon as this one is done
    return;
  }
  polling = true;
  try {
    const key = window.localStorage.getItem(KEY_ITEM);
    const response = await fetch(SWARM_URL, {
      headers: key ? { Authorization: `Bearer ${key}` } : {},
      cache: "no-store",
    });
    if (response.status === 401) {
      showStatus("this gateway needs an API key: enter one above, or open /dashboard?key=…", "error");
    } else if (!response.ok) {
      showStatus(`GET /v1/swarm answered HTTP ${response.status}`, "error");
    } else {
      render(await response.json());
      showStatus(`live · updated ${new Date().toLocaleTimeString()} · every ${POLL_MS / 1000} s`, "ok");
    }
  } catch (error) {
    showStatus(`gateway unreachable (${error.message}); retrying`, "error");
  } finally {
    polling = false;
  }
  if (again) {
    again = false;
    poll();
  } else {
    timer = window.setTimeout(poll, POLL_MS);
  }
}

function showStatus(text, kind) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = kind;
  document.body.dataset.status = kind;
}

// -- drawing --
function el(tag, { cls, text, title, data } = {}, ...children) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (title) node.title = title;
  for (const [name, value] of Object.entries(data || {})) node.dataset[name] = String(value);
  node.append(...children);
  return node;
}

function shortPeer(peer) {
  return peer.length > 12 ? `…${peer.slice(-10)}` : peer;
}

function blockRanges(blocks) {
  const ranges = [];
  for (const block of blocks) {
    const last = ranges[ranges.length - 1];
    if (last && last[1] === block - 1) last[1] = block;
    else ranges.push([block, block]);
  }
  return ranges.map(([a, b]) => (a === b ? `${a}` : `${a}-${b}`)).join(", ");
}

const number = new Intl.NumberFormat(undefined, { maximumFractionDigits: 1 });

function render(view) {
  const swarm = view.swarm || {};
  const banned = new Map((swarm.banned || []).map((ban) => [ban.peer_id, ban]));
  const swarmModels = swarm.models || {};
  const served = new Map((view.models || []).map((model) => [model.id, model]));
  const names = [...new Set([...served.keys(), ...Object.keys(swarmModels)])].sort();
  const sections = names.map((name) => renderModel(name, swarmModels[name], served.get(name), banned));
  if (!sections.length) sections.push(el("section", { cls: "note", text: "No model served here or announced in the swarm." }));
  document.getElementById("models").replaceChildren(...sections);
  renderBanned([...banned.values()]);
  renderTotals(swarm);
}

function renderModel(name, info, served, banned) {
  // Without `info` (no server announces the model, or a backend that reports coverage only), the
  // gateway's own coverage of the model is all there is.
  const numBlocks = info ? info.num_blocks : served.num_blocks;
  const servers = info ? info.servers : [];
  const cells = info ? info.blocks.map((block) => blockCell(block, banned)) : coverageCells(served);
  const missing = cells.filter((cell) => cell.state === "missing").map((cell) => cell.block);

  const badge = missing.length
    ? el("span", { cls: "badge bad", text: `missing blocks ${blockRanges(missing)}` })
    : el("span", { cls: "badge ok", text: `all ${numBlocks} blocks covered` });
  const meta = [`${numBlocks} blocks`, `${servers.length} servers`];
  if (info && info.checkpoints.length) meta.push(`checkpoint ${info.checkpoints.map((c) => c.slice(0, 12)).join(", ")}`);
  if (!served) meta.push("not served by this gateway");
  else if (!served.complete) meta.push(`this gateway cannot serve it now: blocks ${blockRanges(served.missing_blocks)} have no server of its checkpoint`);
  else meta.push("served by this gateway");
  const none = served && served.complete ? "This gateway's backend reports no servers." : "No server announces this model.";

  return el(
    "section",
    { cls: "model", data: { model: name, missing: missing.join(",") } },
    el("h2", { text: name }, badge),
    el("p", { cls: "meta", text: meta.join(" · ") }),
    renderMap(numBlocks, servers, cells, banned),
    servers.length ? renderServers(servers, banned) : el("p", { cls: "note", text: none }),
  );
}

function blockCell(block, banned) {
  const usable = block.servers.filter((peer) => !banned.has(peer));
  return {
    block: block.block,
    state: !block.servers.length ? "missing" : usable.length ? "covered" : "banned-only",
    text: usable.length || "",
    title: `block ${block.block}: ${block.servers.length} servers (${usable.length} not banned), ` +
      `${number.format(block.throughput)} tok/s`,
  };
}

function coverageCells(served) {
  const missing = new Set(served.missing_blocks);
  return Array.from({ length: served.num_blocks }, (_, block) => {
    const state = missing.has(block) ? "missing" : "covered";
    return { block, state, text: "", title: `block ${block}: ${state}` };
  });
}

function renderMap(numBlocks, servers, cells, banned) {
  const map = el("div", { cls: "map", data: { blocks: numBlocks } });
  map.style.gridTemplateColumns = `minmax(8rem, 12rem) repeat(${numBlocks}, minmax(0, 1fr))`;
  const step = Math.max(1, Math.ceil(numBlocks / 32)); // block numbers stay legible on big models
  const place = (node, row, start, end) => {
    node.style.gridRow = String(row);
    node.style.gridColumn = `${start + 2} / ${end + 2}`;
    return node;
  };

  map.append(place(el("div", { cls: "label", text: "block" }), 1, -1, 0));
  for (let block = 0; block < numBlocks; block++) {
    map.append(place(el("div", { cls: "index", text: block % step === 0 ? block : "" }), 1, block, block + 1));
  }
  servers.forEach((server, i) => {
    const row = i + 2;
    const isBanned = banned.has(server.peer_id);
    map.append(place(el("div", { cls: "label", text: shortPeer(server.peer_id), title: server.peer_id }), row, -1, 0));
    const bar = el("div", {
      cls: isBanned ? "bar banned" : "bar",
      text: `[${server.start}, ${server.end}) · ${number.format(server.throughput)} tok/s`,
      title: `${server.peer_id}: blocks [${server.start}, ${server.end})${isBanned ? " · BANNED" : ""}`,
      data: { peer: server.peer_id, start: server.start, end: server.end },
    });
    map.append(place(bar, row, server.start, server.end));
  });
  const row = servers.length + 2;
  map.append(place(el("div", { cls: "label", text: "coverage" }), row, -1, 0));
  for (const { block, state, text, title } of cells) {
    const cell = el("div", { cls: `cell ${state}`, text, title, data: { block, state } });
    map.append(place(cell, row, block, block + 1));
  }
  return map;
}

function renderServers(servers, banned) {
  const head = el("tr", {}, ...[
    ["server"], ["blocks"], ["throughput (tok/s)", "number"], ["sessions", "number"],
    ["free cache tokens", "number"], ["RTT (ms)", "number"], ["quant"], ["version"], ["status"],
  ].map(([text, cls]) => el("th", { text, cls })));
  const rows = servers.map((server) => {
    const ban = banned.get(server.peer_id);
    const rtt = server.rtt_ms === null || server.rtt_ms === undefined
      ? el("td", { cls: "number rtt", text: "—", title: "not measured: this gateway has opened no session on it" })
      : el("td", { cls: "number rtt", text: number.format(server.rtt_ms) });
    return el(
      "tr",
      { cls: ban ? "banned" : "", data: { peer: server.peer_id } },
      el("td", { cls: "peer", text: shortPeer(server.peer_id), title: server.peer_id }),
      el("td", { cls: "span", text: `[${server.start}, ${server.end})` }),
      el("td", { cls: "number throughput", text: number.format(server.throughput) }),
      el("td", { cls: "number sessions", text: server.sessions }),
      el("td", { cls: "number free-tokens", text: server.free_tokens }),
      rtt,
      el("td", { text: server.quant }),
      el("td", { text: server.version }),
      el("td", { cls: "state", text: ban ? "banned" : "ok", title: ban ? ban.reason : "" }),
    );
  });
  return el("table", { cls: "servers" }, el("thead", {}, head), el("tbody", {}, ...rows));
}

function renderBanned(bans) {
  const section = document.getElementById("banned-section");
  section.hidden = !bans.length;
  section.querySelector("tbody").replaceChildren(...bans.map((ban) => el(
    "tr",
    { data: { peer: ban.peer_id } },
    el("td", { cls: "peer", text: ban.peer_id }),
    el("td", { text: new Date(ban.since * 1000).toLocaleString() }),
    el("td", { cls: "reason", text: ban.reason }),
  )));
}

function renderTotals(swarm) {
  const parts = [];
  if (swarm.replays !== undefined) parts.push(`replayed hops: ${swarm.replays}`);
  const v = swarm.verification;
  if (v) parts.push(`spot checks: ${v.checks}, mismatches: ${v.mismatches}, undecided: ${v.undecided}, bans: ${v.bans}`);
  document.getElementById("totals").textContent = parts.join(" · ");
}

document.addEventListener("DOMContentLoaded", () => {
  takeKeyFromAddress();
  const input = document.getElementById("key");
  input.value = window.localStorage.getItem(KEY_ITEM) || "";
  document.getElementById("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    saveKey(input.value.trim());
    poll();
  });
  poll();
});
