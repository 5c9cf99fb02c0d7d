// Conveyor board: live refresh by polling the page's JSON twin, copy buttons, confirmations.
// No framework, no inline script (the CSP forbids it); every region is server-rendered HTML.
(function () {
  "use strict";
  var body = document.body;
  var url = body.getAttribute("data-live");
  var every = parseInt(body.getAttribute("data-refresh-ms"), 10) || 0;
  var status = document.getElementById("live-status");
  var busy = false;

  function keep(region) {
    // Never yank content from under the operator: a focused control or an open detail stays.
    var active = document.activeElement;
    if (active && active !== body && region.contains(active)) return true;
    return region.querySelector("details[open]") !== null;
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
          if (el && !keep(el) && el.innerHTML !== regions[name]) el.innerHTML = regions[name];
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

  document.addEventListener("click", function (ev) {
    var btn = ev.target.closest ? ev.target.closest("[data-copy]") : null;
    if (!btn) return;
    var text = btn.getAttribute("data-copy");
    var done = function () {
      var old = btn.textContent;
      btn.textContent = "Copied";
      setTimeout(function () { btn.textContent = old; }, 1500);
    };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, function () { fallback(text); done(); });
    } else {
      fallback(text);
      done();
    }
  });

  function fallback(text) {
    var area = document.createElement("textarea");
    area.value = text;
    area.setAttribute("readonly", "");
    area.className = "sr-only";
    body.appendChild(area);
    area.select();
    try { document.execCommand("copy"); } catch (e) { /* nothing else to try */ }
    body.removeChild(area);
  }

  document.addEventListener("submit", function (ev) {
    var form = ev.target;
    var question = form.getAttribute && form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) ev.preventDefault();
  });
})();
