// Conveyor board: live refresh by polling the page's JSON twin, copy buttons, confirmations.
// No framework, no inline script (the CSP forbids it); every region is server-rendered HTML.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-live");
  var every = parseInt(body.getAttribute("data-refresh-ms"), 10) || 0;
  var status = document.getElementById("live-status");
  var busy = false;
  var timer = null;
  // The fingerprint of the HTML each region last received (the page renders it in
  // data-hash): a region is swapped only when the server's copy changed, so neither the
  // first poll nor an unchanged one drops a selection or an opened step.
  var last = {};
  document.querySelectorAll("[data-region]").forEach(function (el) {
    last[el.getAttribute("data-region")] = el.getAttribute("data-hash");
  });
  var FOCUSABLE = "a[href], button, summary, input, select, textarea, [tabindex]";

  function typing(region) {
    // Never yank a field from under the operator's fingers: a region whose input, select or
    // textarea holds the focus waits. Any other focus (a summary, a button) is restored.
    var active = document.activeElement;
    return !!active && region.contains(active) && /^(INPUT|SELECT|TEXTAREA)$/.test(active.tagName);
  }

  function swap(region, html) {
    // Open or closed, each <details id=…> keeps the state the operator gave it; the focused
    // element comes back by its id (or, without one, by its place among the focusables).
    var state = {};
    region.querySelectorAll("details[id]").forEach(function (d) { state[d.id] = d.open; });
    var active = document.activeElement;
    var focusId = null, focusAt = -1;
    if (active && active !== body && region.contains(active)) {
      focusId = active.id || null;
      focusAt = Array.prototype.indexOf.call(region.querySelectorAll(FOCUSABLE), active);
    }
    region.innerHTML = html;
    region.querySelectorAll("details[id]").forEach(function (d) {
      if (Object.prototype.hasOwnProperty.call(state, d.id)) d.open = state[d.id];
    });
    var again = focusId ? document.getElementById(focusId) : null;
    if (!again && focusAt >= 0) again = region.querySelectorAll(FOCUSABLE)[focusAt] || null;
    if (again && region.contains(again)) again.focus({ preventScroll: true });
  }

  function stop(note) {
    if (timer !== null) clearInterval(timer);
    timer = null;
    url = null;
    if (status) status.textContent = note;
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
        var hashes = doc.hashes || {};
        Object.keys(regions).forEach(function (name) {
          var el = document.querySelector('[data-region="' + name + '"]');
          var hash = hashes[name] || regions[name];
          if (!el || typing(el) || last[name] === hash) return;
          swap(el, regions[name]);
          last[name] = hash;
        });
        if (doc.final) {
          // A finished run changes only through an action, which reloads the page.
          stop("Run finished: live refresh stopped");
        } else if (status) {
          status.textContent = "Updated " + new Date().toLocaleTimeString();
        }
      })
      .catch(function (e) {
        if (status && url) status.textContent = "Live refresh failed (" + e.message + "), retrying";
      })
      .then(function () { busy = false; });
  }

  if (url && every > 0) {
    timer = setInterval(refresh, every);
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
