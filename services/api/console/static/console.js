// Live progress on the broadcast list: rows being sent are refreshed every 2 s (no reload).
(function () {
  "use strict";
  function live() {
    return Array.prototype.map.call(document.querySelectorAll("[data-live]"), function (row) {
      return row.getAttribute("data-broadcast");
    });
  }
  function refresh() {
    var ids = live();
    if (!ids.length) return;
    var query = ids.map(function (id) { return "id=" + encodeURIComponent(id); }).join("&");
    fetch("/console/broadcasts/progress?" + query, { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (data) {
        if (!data) return;
        data.items.forEach(function (item) {
          var row = document.querySelector('[data-broadcast="' + item.id + '"]');
          if (!row) return;
          ["sent", "failed", "queued", "partial", "canceled", "skipped", "total"].forEach(function (field) {
            var cell = row.querySelector('[data-field="' + field + '"]');
            if (cell) cell.textContent = item[field];
          });
          var badge = row.querySelector('[data-field="status"]');
          if (badge) { badge.textContent = item.status_label; badge.className = "badge badge-" + item.status; }
          if (item.status !== "in_progress") row.removeAttribute("data-live");
        });
      })
      .catch(function () {});
  }
  // Send times are typed in the operator's own time zone: the form says which.
  function timezone() {
    var zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "UTC";
    document.querySelectorAll("input[data-timezone]").forEach(function (input) {
      if (!input.value) input.value = zone;
    });
    document.querySelectorAll("[data-timezone-name]").forEach(function (el) {
      var input = document.querySelector("input[data-timezone]");
      el.textContent = input ? input.value : zone;
    });
  }
  // The people picker's count follows its filter as it changes (the list, on "Select people").
  function picker() {
    var form = document.getElementById("picker");
    var out = document.querySelector("[data-count]");
    if (!form || !out) return;
    form.addEventListener("change", function (event) {
      // The list below and the create form still hold the filter the page was drawn with:
      // creating waits for "Select people" to bring them up to date.
      var create = document.querySelector("[data-create]");
      var stale = document.querySelector("[data-stale]");
      if (create) create.disabled = true;
      if (stale) stale.hidden = false;
      // Another channel has other accounts: its count comes with "Select people".
      if (event.target && event.target.name === "channel") return;
      var query = new URLSearchParams(new FormData(form)).toString();
      fetch("/console/audience/count?" + query, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) { if (data) out.textContent = data.count; })
        .catch(function () {});
    });
  }
  // Chosen images shown before they are sent, in the order they go out; each can be moved
  // earlier or later, or taken out, and the file field is rewritten in that order.
  function previews() {
    document.querySelectorAll("input[type=file][data-previews]").forEach(function (input) {
      var list = document.getElementById(input.getAttribute("data-previews"));
      if (!list) return;
      var files = [];
      function button(label, text, onclick) {
        var b = document.createElement("button");
        b.type = "button";
        b.textContent = text;
        b.setAttribute("aria-label", label);
        b.addEventListener("click", onclick);
        return b;
      }
      function apply(focusIndex, focusWhich) {
        if (typeof DataTransfer === "function") {
          var dt = new DataTransfer();
          files.forEach(function (f) { dt.items.add(f); });
          input.files = dt.files;
        }
        draw();
        if (focusIndex === undefined) {
          input.focus();
        } else if (list.children[focusIndex]) {
          var target = list.children[focusIndex].querySelector('[data-move="' + focusWhich + '"]') ||
            list.children[focusIndex].querySelector("button");
          if (target) target.focus();
        }
      }
      function draw() {
        list.textContent = "";
        files.forEach(function (file, i) {
          var item = document.createElement("li");
          var img = document.createElement("img");
          img.src = URL.createObjectURL(file);
          img.alt = (i + 1) + ": " + file.name;
          img.width = 96;
          var caption = document.createElement("span");
          caption.textContent = (i + 1) + ". " + file.name + " (" + Math.ceil(file.size / 1024) + " KB)";
          var tools = document.createElement("span");
          tools.className = "image-tools";
          if (i > 0) {
            var up = button("Move earlier: " + file.name, "Move earlier", function () {
              files.splice(i - 1, 0, files.splice(i, 1)[0]);
              apply(i - 1, "earlier");
            });
            up.setAttribute("data-move", "earlier");
            tools.appendChild(up);
          }
          if (i < files.length - 1) {
            var down = button("Move later: " + file.name, "Move later", function () {
              files.splice(i + 1, 0, files.splice(i, 1)[0]);
              apply(i + 1, "later");
            });
            down.setAttribute("data-move", "later");
            tools.appendChild(down);
          }
          tools.appendChild(button("Remove: " + file.name, "Remove", function () {
            files.splice(i, 1);
            apply(files.length ? Math.min(i, files.length - 1) : undefined, "remove");
          }));
          item.appendChild(img);
          item.appendChild(caption);
          item.appendChild(tools);
          list.appendChild(item);
        });
      }
      input.addEventListener("change", function () {
        files = Array.prototype.slice.call(input.files);
        draw();
      });
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    picker();
    previews();
    timezone();
    setInterval(refresh, 2000);
  });
})();
