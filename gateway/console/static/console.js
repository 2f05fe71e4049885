// Keystile console: progressive enhancement only. Every page and action works without this file;
// with it, times show in the viewer's time zone, the new key has a copy button and dialogs are
// modal (Escape or a close link goes back to the list).
(function () {
  "use strict";

  function pad(n) { return (n < 10 ? "0" : "") + n; }

  // Times: the page shows UTC; show local time and keep UTC in the title (on hover).
  document.querySelectorAll("time[data-local]").forEach(function (el) {
    var d = new Date(el.getAttribute("datetime"));
    if (isNaN(d.getTime())) { return; }
    el.textContent = d.toLocaleString(undefined, {
      year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit"
    });
  });

  // Expiry inputs: the server fills them in UTC; edit them in local time and say the offset.
  // The offset is the one in force on the chosen date (summer time differs from today's).
  document.querySelectorAll("input[name=tz_offset]").forEach(function (el) {
    el.form.addEventListener("submit", function () {
      var when = el.form.querySelector("input[name=expires_at]");
      var d = when && when.value ? new Date(when.value) : new Date();
      el.value = String(isNaN(d.getTime()) ? new Date().getTimezoneOffset() : d.getTimezoneOffset());
    });
  });
  document.querySelectorAll("input[type=datetime-local][data-utc]").forEach(function (el) {
    var utc = el.getAttribute("data-utc");
    if (!utc || el.value !== utc) { return; }
    var d = new Date(utc + ":00Z");
    el.value = d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + "T" +
      pad(d.getHours()) + ":" + pad(d.getMinutes());
  });

  // Copy buttons.
  document.querySelectorAll("button[data-copy]").forEach(function (btn) {
    btn.hidden = false;
    btn.addEventListener("click", function () {
      var field = document.getElementById(btn.getAttribute("data-copy"));
      var done = function () { btn.textContent = "Copied"; };
      if (navigator.clipboard && window.isSecureContext) {
        navigator.clipboard.writeText(field.value).then(done, function () {
          field.select(); document.execCommand("copy"); done();
        });
      } else {
        field.select(); document.execCommand("copy"); done();
      }
    });
  });

  // Dialogs rendered open become modal; closing one returns to the plain list (without the
  // dialog in the address, so a reload never reopens it).
  document.querySelectorAll("dialog[data-modal]").forEach(function (dlg) {
    if (dlg.open) { dlg.close(); }
    dlg.showModal();
    dlg.addEventListener("cancel", function (e) {
      e.preventDefault();
      window.location.replace(dlg.getAttribute("data-return"));
    });
  });
})();
