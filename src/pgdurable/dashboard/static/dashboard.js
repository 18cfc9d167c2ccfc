// The dashboard's only script: live regions, confirmations, and a JSON check of the signal
// form. Everything works without it, only less conveniently (pages do not refresh).
"use strict";

// An element with data-refresh="URL" is replaced every data-interval ms by what URL returns,
// until that contains an element marked data-final. A list with ticked boxes waits: a refresh
// would untick them.
function startRefresh(region) {
  const url = region.dataset.refresh;
  const interval = Number(region.dataset.interval || 2000);
  let timer = null;
  async function refresh() {
    if (region.querySelector("input[type=checkbox]:checked")) {
      timer = setTimeout(refresh, interval);
      return;
    }
    try {
      const response = await fetch(url, {
        credentials: "same-origin",
        cache: "no-store",
        redirect: "error",
      });
      if (response.status === 401) {
        return; // logged out: the page's next load asks to log in again
      }
      if (response.ok) {
        region.innerHTML = await response.text();
        wireSelectAll(region);
        if (region.querySelector("[data-final]")) {
          return;
        }
      }
    } catch (err) {
      // The dashboard restarting, or the network: try again at the next tick.
    }
    timer = setTimeout(refresh, interval);
  }
  if (!region.querySelector("[data-final]")) {
    timer = setTimeout(refresh, interval);
  }
  return () => clearTimeout(timer);
}

function wireSelectAll(root) {
  for (const all of root.querySelectorAll("input.select-all")) {
    all.addEventListener("change", () => {
      const table = all.closest("table");
      for (const box of table.querySelectorAll("input[name=ids]:not([disabled])")) {
        box.checked = all.checked;
      }
    });
  }
}

// A form with data-confirm asks before it is sent.
function wireConfirm(form) {
  form.addEventListener("submit", (event) => {
    if (!window.confirm(form.dataset.confirm)) {
      event.preventDefault();
    }
  });
}

// A form with data-json-field="name" refuses to send a field that is not JSON (the server
// checks again).
function wireJsonCheck(form) {
  const field = form.elements[form.dataset.jsonField];
  const message = form.querySelector(".json-error");
  form.addEventListener("submit", (event) => {
    const text = field.value.trim();
    try {
      if (text !== "") {
        JSON.parse(text);
      }
      message.textContent = "";
    } catch (err) {
      event.preventDefault();
      message.textContent = "Not JSON: " + err.message;
      field.focus();
    }
  });
}

document.addEventListener("DOMContentLoaded", () => {
  for (const region of document.querySelectorAll("[data-refresh]")) {
    startRefresh(region);
  }
  for (const form of document.querySelectorAll("form[data-confirm]")) {
    wireConfirm(form);
  }
  for (const form of document.querySelectorAll("form[data-json-field]")) {
    wireJsonCheck(form);
  }
  wireSelectAll(document);
});
