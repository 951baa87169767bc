/* kefu chat widget: put this on any page and a chat button opens the kefu chat.
 *
 *   <script src="https://kefu.example.com/widget.js" data-tenant="demo" async></script>
 *
 * Optional: data-customer (your own id for the signed-in user; default: a random id
 * the gateway issues and the chat page keeps) with data-customer-signature (hex
 * HMAC-SHA256 of that id with the tenant's widget secret, computed by your backend;
 * required when the tenant has one), data-open="true" (open at load), data-title,
 * data-position ("right" | "left"). The chat runs in an iframe served by the gateway,
 * so the page's styles and scripts never touch it. window.kefuWidget.open() / close()
 * / toggle(). Pictures and files come along with no other tag: the chat's attach button,
 * files dropped on the panel and screenshots pasted into it (uploads go to the gateway).
 */
(function () {
  "use strict";
  if (window.kefuWidget) return;
  var script = document.currentScript ||
    document.querySelector('script[src$="/widget.js"]');
  if (!script) return;
  var origin = new URL(script.src, location.href).origin;
  var data = script.dataset;
  var query = new URLSearchParams({ tenant: data.tenant || "demo", embed: "1" });
  if (data.customer) query.set("customer", data.customer);
  if (data.customerSignature) query.set("signature", data.customerSignature);
  var side = data.position === "left" ? "left" : "right";
  var title = data.title || "Chat with us";

  var button = document.createElement("button");
  button.type = "button";
  button.id = "kefu-widget-button";
  button.setAttribute("aria-label", title);
  // An inline icon: no font or image to load from the host page.
  button.innerHTML = '<svg viewBox="0 0 24 24" width="28" height="28" aria-hidden="true">' +
    '<path fill="currentColor" d="M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5' +
    'a2 2 0 0 1 2-2z"/></svg>';
  button.style.cssText = "position:fixed;bottom:20px;" + side + ":20px;z-index:2147483000;" +
    "width:56px;height:56px;border-radius:50%;border:0;background:#0b5394;color:#fff;" +
    "display:flex;align-items:center;justify-content:center;cursor:pointer;box-shadow:0 2px 10px rgba(0,0,0,.3)";

  var panel = document.createElement("div");
  panel.id = "kefu-widget-panel";
  panel.setAttribute("role", "dialog");
  panel.setAttribute("aria-label", title);
  panel.style.cssText = "position:fixed;bottom:88px;" + side + ":20px;z-index:2147483000;" +
    "width:360px;max-width:calc(100vw - 40px);height:520px;max-height:calc(100vh - 110px);" +
    "display:none;flex-direction:column;background:#fff;border-radius:10px;overflow:hidden;" +
    "box-shadow:0 4px 24px rgba(0,0,0,.3);font-family:system-ui,sans-serif";
  var header = document.createElement("div");
  header.textContent = title;
  header.style.cssText = "background:#0b5394;color:#fff;padding:10px 14px;font-weight:600";
  panel.appendChild(header);
  var frame = null;  // created on first open: no socket for visitors who never chat

  function open() {
    if (!frame) {
      frame = document.createElement("iframe");
      frame.id = "kefu-widget-frame";
      frame.title = title;
      frame.allow = "clipboard-read; clipboard-write";  // pasting a screenshot into the chat
      frame.src = origin + "/chat?" + query.toString();
      frame.style.cssText = "flex:1;border:0;width:100%";
      panel.appendChild(frame);
    }
    panel.style.display = "flex";
    button.setAttribute("aria-expanded", "true");
  }
  function close() { panel.style.display = "none"; button.setAttribute("aria-expanded", "false"); }
  function toggle() { if (panel.style.display === "none") open(); else close(); }
  button.addEventListener("click", toggle);

  function mount() {
    document.body.appendChild(panel);
    document.body.appendChild(button);
    if (data.open === "true") open();
  }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
  window.kefuWidget = { open: open, close: close, toggle: toggle };
})();
