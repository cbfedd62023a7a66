// livemesh live-video page: one EventSource to this frontend, likes and comments through its
// API.  Everything that came from the network is put on the page with textContent, never
// innerHTML: a comment is text, whatever it contains.
"use strict";

(() => {
  const VIDEO_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;
  const DEFAULT_VIDEO = "launch-42";
  const MAX_COMMENTS = 200;   // older ones leave the list
  const MAX_FLOATS = 40;      // hearts on screen at once (a hot video gets 100 likes/s)
  const SEEN_MAX = 5000;      // event ids remembered to drop duplicates

  const $ = (id) => document.getElementById(id);
  const el = {
    pick: $("pick"), video: $("video"), status: $("status"), servedBy: $("served-by"),
    title: $("title"), viewers: $("viewers"), presence: $("presence"), likesLayer: $("likes-layer"), like: $("like"),
    likeTotal: $("like-total"), lastLike: $("last-like"), user: $("user"),
    comments: $("comments"), noComments: $("no-comments"), commentForm: $("comment-form"),
    commentText: $("comment-text"), send: $("send"), error: $("error"), canvas: $("pattern"),
  };

  const state = { video: null, es: null, likes: 0, seen: new Set(), seenOrder: [] };

  // --- connection -----------------------------------------------------------------------

  function setStatus(kind, text) {
    el.status.dataset.state = kind;
    el.status.textContent = text;
  }

  function watch(video) {
    if (!VIDEO_RE.test(video)) {
      showError("invalid_video: a video id is 1-64 characters of A-Z a-z 0-9 . _ -, " +
                "starting with a letter or digit");
      return;
    }
    if (state.es) state.es.close();
    clearError();
    state.video = video;
    state.likes = 0;
    state.seen.clear();
    state.seenOrder = [];
    el.video.value = video;
    el.title.textContent = video;
    document.title = `${video} · livemesh`;
    el.viewers.textContent = "–";
    el.presence.textContent = "";
    el.likeTotal.textContent = "0";
    el.lastLike.textContent = "";
    el.comments.replaceChildren();
    el.likesLayer.replaceChildren();
    el.noComments.hidden = false;
    setControls(true);
    const q = new URLSearchParams(location.search);
    q.set("video", video);
    history.replaceState(null, "", `?${q}`);

    setStatus("connecting", "connecting…");
    const user = el.user.value.trim();  // who is watching, for presence (anonymous without)
    const who = user ? `?user=${encodeURIComponent(user)}` : "";
    const es = new EventSource(`/v1/videos/${encodeURIComponent(video)}/events${who}`);
    state.es = es;
    const mine = (fn) => (e) => { if (state.es === es) fn(e); };
    es.onopen = mine(() => setStatus("live", "live"));
    es.onerror = mine(() => {
      if (es.readyState === EventSource.CLOSED) {
        setStatus("offline", "disconnected");
      } else {
        setStatus("reconnecting", "reconnecting…");
      }
    });
    es.addEventListener("like", mine((e) => { const ev = parse(e); if (ev && fresh(ev)) onLike(ev); }));
    // a hot video's likes may come aggregated: one "likes" event per run ({count, users, ...})
    es.addEventListener("likes", mine((e) => { const ev = parse(e); if (ev && fresh({ id: `likes ${ev.last_id}` })) onLikes(ev); }));
    es.addEventListener("comment", mine((e) => { const ev = parse(e); if (ev && fresh(ev)) onComment(ev); }));
    es.addEventListener("count", mine((e) => { const ev = parse(e); if (ev) onCount(ev); }));
    es.addEventListener("join", mine((e) => { const ev = parse(e); if (ev) onPresence(ev, "joined"); }));
    es.addEventListener("leave", mine((e) => { const ev = parse(e); if (ev) onPresence(ev, "left"); }));
  }

  function parse(e) {
    try {
      return JSON.parse(e.data);
    } catch (err) {
      console.warn("livemesh: undecodable event", e.data, err);
      return null;
    }
  }

  function fresh(ev) {
    if (typeof ev.id !== "string") return true;
    if (state.seen.has(ev.id)) return false;
    state.seen.add(ev.id);
    state.seenOrder.push(ev.id);
    if (state.seenOrder.length > SEEN_MAX) state.seen.delete(state.seenOrder.shift());
    return true;
  }

  // --- events ---------------------------------------------------------------------------

  function onLike(ev) {
    countLikes(1, ev.user ? [ev.user] : []);
    floatHeart(ev, "❤");
  }

  function onLikes(ev) {
    const count = Number.isInteger(ev.count) && ev.count > 0 ? ev.count : 1;
    const users = Array.isArray(ev.users) ? ev.users.filter((u) => typeof u === "string") : [];
    countLikes(count, users);
    floatHeart({ id: ev.last_id, user: users.join(" ") }, `+${count.toLocaleString()} ❤`, "like-burst");
  }

  function countLikes(count, users) {
    state.likes += count;
    el.likeTotal.textContent = state.likes.toLocaleString();
    el.lastLike.textContent = users.length ? `♥ ${users.join(", ")}` : "";
  }

  function floatHeart(ev, text, extraClass) {
    while (el.likesLayer.childElementCount >= MAX_FLOATS) el.likesLayer.firstElementChild.remove();
    const heart = document.createElement("span");
    heart.className = extraClass ? `like-float ${extraClass}` : "like-float";
    heart.textContent = text;
    heart.dataset.id = ev.id || "";
    heart.dataset.user = ev.user || "";
    heart.style.setProperty("left", `${10 + Math.random() * 70}%`);
    heart.style.setProperty("--drift", `${Math.round((Math.random() - 0.5) * 80)}px`);
    heart.style.setProperty("--dur", `${(2.2 + Math.random() * 1.2).toFixed(2)}s`);
    heart.addEventListener("animationend", () => heart.remove());
    el.likesLayer.append(heart);
  }

  function onComment(ev) {
    const list = el.comments;
    const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
    const item = document.createElement("li");
    item.className = "comment";
    item.dataset.id = ev.id || "";
    const meta = document.createElement("div");
    meta.className = "meta";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = ev.user || "anonymous";
    const when = document.createElement("time");
    when.className = "when";
    if (typeof ev.ts === "number") {
      const t = new Date(ev.ts);
      when.dateTime = t.toISOString();
      when.textContent = t.toLocaleTimeString();
    }
    meta.append(who, when);
    const text = document.createElement("div");
    text.className = "text";
    text.textContent = typeof ev.text === "string" ? ev.text : "";
    item.append(meta, text);
    list.append(item);
    while (list.childElementCount > MAX_COMMENTS) list.firstElementChild.remove();
    el.noComments.hidden = true;
    if (atBottom) list.scrollTop = list.scrollHeight;
  }

  function onCount(ev) {
    if (ev.video !== undefined && ev.video !== state.video) return;
    if (Number.isFinite(ev.count)) el.viewers.textContent = ev.count.toLocaleString();
  }

  let presenceTimer = null;

  function onPresence(ev, verb) {
    if (ev.video !== undefined && ev.video !== state.video) return;
    if (typeof ev.user !== "string") return;
    el.presence.textContent = `${ev.user} ${verb}`;
    clearTimeout(presenceTimer);
    presenceTimer = setTimeout(() => { el.presence.textContent = ""; }, 4000);
  }

  // --- publishing -----------------------------------------------------------------------

  async function publish(kind, body) {
    const video = state.video;
    let resp;
    try {
      resp = await fetch(`/v1/videos/${encodeURIComponent(video)}/${kind}`, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
    } catch (err) {
      showError(`network error: ${err.message} (retry when the connection is back)`);
      return false;
    }
    if (resp.status === 202) {
      clearError();
      return true;
    }
    let error = { code: `http_${resp.status}`, message: resp.statusText || "request failed", retryable: resp.status >= 500 };
    try {
      const data = await resp.json();
      if (data && data.error) error = data.error;
    } catch (_) { /* not JSON: keep the status line */ }
    showError(`${error.code}: ${error.message}${error.retryable ? " (you can retry)" : ""}`);
    return false;
  }

  function currentUser() {
    const user = el.user.value.trim();
    try { localStorage.setItem("livemesh.user", user); } catch (_) { /* storage off */ }
    return user || undefined;
  }

  el.like.addEventListener("click", () => {
    el.like.classList.remove("pulse");
    void el.like.offsetWidth; // restart the animation
    el.like.classList.add("pulse");
    publish("likes", { user: currentUser() });
  });

  el.commentForm.addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = el.commentText.value;
    if (!text.trim()) return;
    el.send.disabled = true;
    try {
      if (await publish("comments", { user: currentUser(), text })) el.commentText.value = "";
    } finally {
      el.send.disabled = false;
      el.commentText.focus();
    }
  });

  el.commentText.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      el.commentForm.requestSubmit();
    }
  });

  el.pick.addEventListener("submit", (e) => {
    e.preventDefault();
    watch(el.video.value.trim());
  });

  function setControls(enabled) {
    el.like.disabled = el.commentText.disabled = el.send.disabled = !enabled;
  }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.hidden = true;
    el.error.textContent = "";
  }

  // --- the video: a test pattern --------------------------------------------------------

  const BARS = ["#c0c0c0", "#c0c000", "#00c0c0", "#00c000", "#c000c0", "#c00000", "#0000c0"];

  function drawPattern(now) {
    const c = el.canvas;
    const ratio = window.devicePixelRatio || 1;
    const w = Math.round(c.clientWidth * ratio);
    const h = Math.round(c.clientHeight * ratio);
    if (w && h && (c.width !== w || c.height !== h)) { c.width = w; c.height = h; }
    const g = c.getContext("2d");
    const barH = h * 0.68;
    BARS.forEach((color, i) => {
      g.fillStyle = color;
      g.fillRect(Math.floor(i * w / BARS.length), 0, Math.ceil(w / BARS.length), barH);
    });
    const grad = g.createLinearGradient(0, 0, w, 0);
    grad.addColorStop(0, "#000");
    grad.addColorStop(1, "#fff");
    g.fillStyle = grad;
    g.fillRect(0, barH, w, h * 0.12);
    g.fillStyle = "#101010";
    g.fillRect(0, barH + h * 0.12, w, h - barH - h * 0.12);
    // a sweeping line and a clock show the picture is "live"
    const x = ((now / 4000) % 1) * w;
    g.fillStyle = "rgba(255,255,255,0.35)";
    g.fillRect(x, 0, Math.max(2, w * 0.006), barH);
    const size = Math.max(12, Math.round(h * 0.07));
    g.font = `600 ${size}px ui-monospace, "DejaVu Sans Mono", monospace`;
    g.textBaseline = "middle";
    g.fillStyle = "#e8eaf0";
    const clock = new Date().toLocaleTimeString();
    g.fillText(`${state.video || "no video"}  ·  ${clock}`, w * 0.04, barH + h * 0.06 + (h - barH) * 0.5);
    requestAnimationFrame(drawPattern);
  }

  // --- start ----------------------------------------------------------------------------

  const params = new URLSearchParams(location.search);
  let user = params.get("user");
  if (!user) {
    try { user = localStorage.getItem("livemesh.user"); } catch (_) { user = null; }
  }
  el.user.value = user || `viewer-${Math.floor(1000 + Math.random() * 9000)}`;
  el.servedBy.textContent = location.host;
  setControls(false);
  requestAnimationFrame(drawPattern);
  watch(params.get("video") || DEFAULT_VIDEO);
})();
