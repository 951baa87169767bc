/* kefu chat widget: put this on any page and a chat button opens the kefu chat.
 *
 *   <script src="https://kefu.example.com/widget.js" data-tenant="demo" async></script>
 *
 * Optional: data-customer (your own id for the signed-in user; default: a random id
 * the gateway issues and the chat page keeps) with data-customer-signature (hex
 * HMAC-SHA256 of that id with the tenant's widget secret, computed by your backend;
 * required when the tenant has one), data-open="true" (open at load), data-title,
 * data-position ("right" | "left"), data-lang ("zh" | "en"; default: the browser's,
 * Chinese where it asks for Chinese). The chat runs in an iframe served by the gateway,
 * so the page's styles and scripts never touch it. window.kefuWidget.open() / close()
 * / toggle(). Pictures and files come along with no other tag: the chat's attach button,
 * files dropped on the panel and screenshots pasted into it (uploads go to the gateway).
 *
 * The launcher takes the tenant's colour (GET /v1/chat/settings) and shows how many
 * replies came while the chat was closed; on a screen under 480 px the chat fills it.
 * The frame tells this script only numbers and states (postMessage: unread count,
 * close, language, "the visitor has chatted"), never a message's text.
 */
(function () {
  "use strict";
  if (window.kefuWidget) return;
  var script = document.currentScript ||
    document.querySelector('script[src$="/widget.js"]');
  if (!script) return;
  var origin = new URL(script.src, location.href).origin;
  var data = script.dataset;
  var tenant = data.tenant || "demo";
  var query = new URLSearchParams({ tenant: tenant, embed: "1" });
  if (data.customer) query.set("customer", data.customer);
  if (data.customerSignature) query.set("signature", data.customerSignature);
  if (data.title) query.set("title", data.title);
  if (data.lang === "zh" || data.lang === "en") query.set("lang", data.lang);
  var side = data.position === "left" ? "left" : "right";
  // Remembered on this site once the visitor has chatted: the chat then loads with the
  // page (hidden), so replies that come while it is closed show on the launcher.
  var activeKey = "kefuWidgetActive:" + tenant;

  function browserLanguage() {
    var list = navigator.languages || [navigator.language || ""];
    for (var i = 0; i < list.length; i++) {
      var l = (list[i] || "").toLowerCase();
      if (l.indexOf("zh") === 0) return "zh";
      if (l.indexOf("en") === 0) return "en";
    }
    return "en";
  }
  var lang = data.lang === "zh" || data.lang === "en" ? data.lang : browserLanguage();
  var WORDS = {
    zh: { open: "在线客服", unread: function (n) { return "，" + n + " 条新消息"; } },
    en: { open: "Chat with us", unread: function (n) { return ", " + n + " new"; } }
  };

  var style = document.createElement("style");
  style.textContent =
    "#kefu-widget-button{position:fixed;bottom:20px;" + side + ":20px;z-index:2147483000;" +
    "width:58px;height:58px;border-radius:50%;border:0;background:#1565c0;color:#fff;padding:0;" +
    "display:flex;align-items:center;justify-content:center;cursor:pointer;" +
    "box-shadow:0 3px 12px rgba(0,0,0,.3)}" +
    "#kefu-widget-button:focus-visible{outline:3px solid #fff;box-shadow:0 0 0 6px #1565c0}" +
    "#kefu-widget-badge{position:absolute;top:-3px;right:-3px;min-width:22px;height:22px;padding:0 6px;" +
    "border-radius:11px;background:#e53935;color:#fff;font:600 12px/22px system-ui,sans-serif;" +
    "text-align:center;box-shadow:0 0 0 2px #fff}" +
    "#kefu-widget-badge[hidden]{display:none}" +
    "#kefu-widget-panel{position:fixed;bottom:90px;" + side + ":20px;z-index:2147483000;" +
    "width:370px;max-width:calc(100vw - 40px);height:560px;max-height:calc(100vh - 110px);" +
    "display:none;background:#f4f6f9;border-radius:12px;overflow:hidden;" +
    "box-shadow:0 6px 28px rgba(0,0,0,.3)}" +
    "#kefu-widget-panel.open{display:block}" +
    "#kefu-widget-frame{display:block;border:0;width:100%;height:100%}" +
    // Phones: the chat takes the whole screen, the launcher steps aside while it is open.
    "@media (max-width:480px){#kefu-widget-panel{inset:0;width:100%;max-width:none;" +
    "height:100%;max-height:none;border-radius:0}" +
    "#kefu-widget-button[aria-expanded=true]{display:none}}";

  var button = document.createElement("button");
  button.type = "button";
  button.id = "kefu-widget-button";
  button.setAttribute("aria-expanded", "false");
  button.setAttribute("aria-controls", "kefu-widget-panel");
  // An inline icon: no font or image to load from the host page.
  button.innerHTML = '<svg viewBox="0 0 24 24" width="28" height="28" aria-hidden="true">' +
    '<path fill="currentColor" d="M4 3h16a2 2 0 0 1 2 2v11a2 2 0 0 1-2 2H9l-5 4v-4a2 2 0 0 1-2-2V5' +
    'a2 2 0 0 1 2-2z"/></svg><span id="kefu-widget-badge" aria-hidden="true" hidden></span>';
  var badge = button.querySelector("span");

  var panel = document.createElement("div");
  panel.id = "kefu-widget-panel";
  panel.setAttribute("role", "dialog");
  var frame = null;  // created on first open (or at load for a returning visitor)
  var unread = 0;

  function title() { return data.title || WORDS[lang].open; }
  function label() {
    var text = title() + (unread ? WORDS[lang].unread(unread) : "");
    button.setAttribute("aria-label", text);
    button.title = text;
    panel.setAttribute("aria-label", title());
    if (frame) frame.title = title();
    badge.textContent = unread > 99 ? "99+" : String(unread);
    badge.hidden = !unread;
  }
  function isOpen() { return panel.classList.contains("open"); }
  function tell(message) { if (frame && frame.contentWindow) frame.contentWindow.postMessage(message, origin); }
  function ensureFrame() {
    if (frame) return;
    frame = document.createElement("iframe");
    frame.id = "kefu-widget-frame";
    frame.allow = "clipboard-read; clipboard-write";  // pasting a screenshot into the chat
    frame.src = origin + "/chat?" + query.toString();
    // Told once it has loaded (it may have been opened before).
    frame.addEventListener("load", function () { tell({ kefu: "visible", value: isOpen() }); });
    panel.appendChild(frame);
    label();
  }
  function open() {
    ensureFrame();
    panel.classList.add("open");
    button.setAttribute("aria-expanded", "true");
    unread = 0;
    label();
    frame.focus();
    tell({ kefu: "visible", value: true });
  }
  function close() {
    var wasOpen = isOpen();
    panel.classList.remove("open");
    button.setAttribute("aria-expanded", "false");
    tell({ kefu: "visible", value: false });
    if (wasOpen) button.focus();  // back where the visitor was
  }
  function toggle() { if (isOpen()) close(); else open(); }
  button.addEventListener("click", toggle);

  window.addEventListener("message", function (e) {
    if (!frame || e.source !== frame.contentWindow || e.origin !== origin) return;
    var m = e.data || {};
    if (m.kefu === "unread") { unread = isOpen() ? 0 : Math.max(0, Number(m.count) || 0); label(); }
    else if (m.kefu === "close") close();
    else if (m.kefu === "lang" && (m.lang === "zh" || m.lang === "en")) { lang = m.lang; label(); }
    else if (m.kefu === "settings") paint(m.color);
    else if (m.kefu === "active") { try { localStorage.setItem(activeKey, "1"); } catch (err) { /* private mode */ } }
  });

  function paint(color) {
    if (!/^#[0-9a-fA-F]{6}$/.test(color || "")) return;
    button.style.background = color;
  }
  function settings() {
    // The tenant's colour for the launcher before the chat is ever opened.
    if (!window.fetch) return;
    fetch(origin + "/v1/chat/settings?tenant=" + encodeURIComponent(tenant))
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (s) { if (s) paint(s.color); })
      .catch(function () { /* the default colour stays */ });
  }

  function mount() {
    document.head.appendChild(style);
    label();
    document.body.appendChild(panel);
    document.body.appendChild(button);
    settings();
    var active = false;
    try { active = localStorage.getItem(activeKey) === "1"; } catch (err) { active = false; }
    if (data.open === "true") open();
    else if (active) ensureFrame();
  }
  if (document.body) mount(); else document.addEventListener("DOMContentLoaded", mount);
  window.kefuWidget = { open: open, close: close, toggle: toggle };
})();
