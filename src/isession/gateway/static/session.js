// The loading page: follow the session's JOB_STATUS and open the app when it is Running.
// Everything shown is set with textContent, so a status or message can never become markup.
(function () {
  "use strict";
  var card = document.querySelector("[data-session]");
  if (!card) { return; }
  var id = card.getAttribute("data-session");
  var shown = document.getElementById("status").textContent;
  var ended = ["Cancelled", "Completed", "Failed"];
  var notifyButton = document.getElementById("notify");
  if (notifyButton && "Notification" in window && Notification.permission === "default") {
    notifyButton.hidden = false;
    notifyButton.addEventListener("click", function () {
      Notification.requestPermission().then(function () { notifyButton.hidden = true; });
    });
  }
  function set(elementId, text) {
    var el = document.getElementById(elementId);
    if (el) { el.textContent = text; }
  }
  function ready(app) {
    if ("Notification" in window && Notification.permission === "granted") {
      try { new Notification("Your session is ready", { body: id, tag: id }); } catch (err) { /* not shown */ }
    }
    window.location.assign(app);
  }
  function poll() {
    fetch("/api/sessions/" + encodeURIComponent(id), { credentials: "same-origin", cache: "no-store" })
      .then(function (r) { if (!r.ok) { throw new Error(String(r.status)); } return r.json(); })
      .then(function (s) {
        set("status", s.status);
        set("message", s.message);
        set("time-left", s.time_left);
        set("idle-left", s.idle_left);
        var warn = document.getElementById("warn");
        if (warn) { warn.textContent = s.warning; warn.hidden = !s.warning; }
        if (s.status === "Running" && s.app && shown !== "Running") { ready(s.app); return; }
        if (ended.indexOf(s.status) >= 0 && ended.indexOf(shown) < 0) { window.location.reload(); return; }
        shown = s.status;
        window.setTimeout(poll, ended.indexOf(s.status) >= 0 ? 10000 : 1000);
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  }
  poll();
}());
