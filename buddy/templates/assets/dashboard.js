// The dashboard's only script: re-fetch the panel every few seconds, and send the buttons' actions with the
// X-Buddy-Action header (which another origin cannot send). Everything shown comes escaped from the server.
(function () {
  "use strict";
  var root = document.getElementById("dashboard");
  var panel = document.getElementById("panel");
  var status = document.getElementById("status");
  if (!root || !panel) {
    return;
  }
  var every = Math.max(1, Number(root.getAttribute("data-refresh-seconds")) || 5) * 1000;
  var busy = false;
  var note = "";  // what the last action did, kept in the status line until the next one

  function say(text, bad) {
    status.textContent = text;
    status.className = bad ? "status bad" : "status";
  }

  function refresh() {
    if (busy) {
      return Promise.resolve();
    }
    busy = true;
    return fetch(root.getAttribute("data-panel-url"), {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (response.status === 401) {
          window.location.reload();  // the session ended: the page shows the sign-in form
          return;
        }
        if (!response.ok) {
          throw new Error("the proxy answered " + response.status);
        }
        return response.text().then(function (html) {
          panel.innerHTML = html;
          say((note ? note + " · " : "") + "updated " + new Date().toLocaleTimeString());
        });
      })
      .catch(function (error) {
        say("could not refresh: " + error.message, true);
      })
      .finally(function () {
        busy = false;
      });
  }

  function act(method, url, done) {
    return fetch(url, {method: method, credentials: "same-origin", headers: {"X-Buddy-Action": "1"}})
      .then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (body) {
          if (!response.ok) {
            throw new Error(body.message || ("the proxy answered " + response.status));
          }
          note = done(body);
          say(note);
          busy = false;
          return refresh();
        });
      })
      .catch(function (error) {
        say(error.message, true);
      });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest ? event.target.closest("button[data-action]") : null;
    if (!button) {
      return;
    }
    var action = button.getAttribute("data-action");
    var url = button.getAttribute("data-url");
    if (action === "clear") {
      var name = button.getAttribute("data-mapping");
      if (window.confirm("Remove every cached response of '" + name + "'? The next requests go upstream again.")) {
        act("DELETE", url, function (body) { return "cleared " + body.cleared + " entries of " + name; });
      }
    } else if (action === "offline") {
      var state = button.getAttribute("data-state");
      var question = state === "on" ? "Take the proxy offline? Nothing will reach any upstream, for everyone."
        : state === "off" ? "Let requests reach the upstreams again?" : "Go back to the configured offline setting?";
      if (window.confirm(question)) {
        act("POST", url, function (body) { return "offline mode is " + (body.offline ? "on" : "off"); });
      }
    } else if (action === "logout") {
      fetch(url, {method: "POST", credentials: "same-origin", headers: {"X-Buddy-Action": "1"}})
        .then(function () { window.location.reload(); });
    }
  });

  window.setInterval(function () {
    if (!document.hidden) {
      refresh();
    }
  }, every);
}());
