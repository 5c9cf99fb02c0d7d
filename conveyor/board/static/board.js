// Conveyor board: live refresh by polling the page's JSON twin, copy buttons, confirmations.
// No framework, no inline script (the CSP forbids it); every region is server-rendered HTML.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-live");
  var every = parseInt(body.getAttribute("data-refresh-ms"), 10) || 0;
  var status = document.getElementById("live-status");
  var busy = false;
  // The HTML each region last received, to swap only when the server's copy changed (the
  // DOM differs from it once a <details> was toggled, and a needless swap drops a selection).
  var last = {};

  function keep(region) {
    // Never yank a control from under the operator's fingers: a region holding the focus
    // waits (open details do not: swap() keeps them open).
    var active = document.activeElement;
    return !!active && active !== body && region.contains(active);
  }

  function swap(region, html) {
    // Open or closed, each <details id=…> keeps the state the operator gave it.
    var state = {};
    region.querySelectorAll("details[id]").forEach(function (d) { state[d.id] = d.open; });
    region.innerHTML = html;
    region.querySelectorAll("details[id]").forEach(function (d) {
      if (Object.prototype.hasOwnProperty.call(state, d.id)) d.open = state[d.id];
    });
  }

  function refresh() {
    if (busy || document.hidden || !url) return;
    busy = true;
    fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) throw new Error("HTTP " + r.status);
        return r.json();
      })
      .then(function (doc) {
        var regions = doc.regions || {};
        Object.keys(regions).forEach(function (name) {
          var el = document.querySelector('[data-region="' + name + '"]');
          if (!el || keep(el) || last[name] === regions[name]) return;
          swap(el, regions[name]);
          last[name] = regions[name];
        });
        if (status) status.textContent = "Updated " + new Date().toLocaleTimeString();
      })
      .catch(function (e) {
        if (status) status.textContent = "Live refresh failed (" + e.message + "), retrying";
      })
      .then(function () { busy = false; });
  }

  if (url && every > 0) {
    setInterval(refresh, every);
    document.addEventListener("visibilitychange", refresh);
  }

  // Copy buttons: data-copy="text" or data-copy-target="id of the element whose text".
  // The Clipboard API needs a secure context (https, or http on localhost/127.0.0.1);
  // elsewhere execCommand("copy"), and if even that is refused the text is left selected.
  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest ? ev.target.closest("[data-copy], [data-copy-target]") : null;
    if (!btn) return;
    var target = btn.hasAttribute("data-copy-target")
      ? document.getElementById(btn.getAttribute("data-copy-target")) : null;
    var text = target ? target.textContent : btn.getAttribute("data-copy");
    if (text === null) return;
    var say = function (word) {
      var old = btn.getAttribute("data-label") || btn.textContent;
      btn.setAttribute("data-label", old);
      btn.textContent = word;
      setTimeout(function () { btn.textContent = old; }, 1500);
    };
    var fallback = function () {
      if (legacyCopy(text)) { say("Copied"); return; }
      if (target) selectText(target);
      say("Press Ctrl+C");
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(function () { say("Copied"); }, fallback);
    } else {
      fallback();
    }
  });

  function legacyCopy(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "sr-only";
    body.appendChild(area);
    area.select();
    var ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    body.removeChild(area);
    return ok;
  }

  function selectText(el) {
    var range = document.createRange();
    range.selectNodeContents(el);
    var sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) ev.preventDefault();
  });
})();
