// A small gateway that speaks the OpenClaw protocol as /work/shared/openclaw-protocol.md
// describes it, with faults to inject on demand. It exists to test the scenarios and the frame
// validator (selftest.mjs): a validator is only worth something if it rejects bad frames, and
// a scenario only if it notices a leak. It is not a model of the moltbot gateway.
import { randomUUID } from "node:crypto";
import { requireDep } from "./lib/deps.mjs";

const { WebSocketServer } = requireDep("ws");

const PROTOCOL = 4;
const METHODS = ["health", "status", "sessions.list", "chat.history", "agent", "chat.send"];
const EVENTS = ["tick", "shutdown", "agent", "chat"];

/**
 * Starts on 127.0.0.1 (ephemeral port). `users`: token → user id. `fault`: one of
 * hello-extra, tick-float, seq-gap, chat-delta-without-text, error-without-code, leak,
 * text-not-cumulative, or none.
 */
export async function startMock({ users, fault = "none", tickMs = 30000 }) {
  const wss = new WebSocketServer({ host: "127.0.0.1", port: 0 });
  await new Promise((resolve, reject) => {
    wss.once("listening", resolve);
    wss.once("error", reject);
  });
  const conns = new Set();

  const send = (conn, frame) => conn.ws.send(JSON.stringify(frame));
  const event = (conn, name, payload) => {
    conn.seq += 1;
    // seq-gap: skip one number on the first agent event.
    if (fault === "seq-gap" && name === "agent" && !conn.skipped) {
      conn.skipped = true;
      conn.seq += 1;
    }
    send(conn, { type: "event", event: name, payload, seq: conn.seq });
  };
  const refuse = (conn, id, error, closeCode) => {
    if (fault === "error-without-code") delete error.code;
    send(conn, { type: "res", id, ok: false, error });
    conn.ws.close(closeCode, error.message.slice(0, 100));
  };
  const tick = (conn) => event(conn, "tick", { ts: fault === "tick-float" ? Date.now() + 0.5 : Date.now() });

  function connect(conn, frame) {
    if (frame.type !== "req" || frame.method !== "connect") {
      return refuse(conn, frame.id ?? "0", { code: "INVALID_REQUEST", message: "first request must be connect" }, 1008);
    }
    const p = frame.params ?? {};
    if (!(p.minProtocol <= PROTOCOL && PROTOCOL <= p.maxProtocol)) {
      return refuse(
        conn,
        frame.id,
        {
          code: "INVALID_REQUEST",
          message: "protocol mismatch",
          details: { code: "PROTOCOL_MISMATCH", expectedProtocol: PROTOCOL },
        },
        1002,
      );
    }
    const user = users[p.auth?.token];
    if (!user) {
      return refuse(
        conn,
        frame.id,
        {
          code: "INVALID_REQUEST",
          message: "unauthorized: gateway token mismatch",
          details: { code: "AUTH_TOKEN_MISMATCH" },
        },
        1008,
      );
    }
    conn.user = user;
    const hello = {
      type: "hello-ok",
      protocol: PROTOCOL,
      server: { version: "mock", connId: randomUUID() },
      features: { methods: METHODS, events: EVENTS },
      snapshot: { presence: [], health: {}, stateVersion: { presence: 0, health: 0 }, uptimeMs: 1 },
      auth: { role: "operator", scopes: p.scopes ?? [] },
      policy: { maxPayload: 26214400, maxBufferedBytes: 52428800, tickIntervalMs: tickMs },
    };
    if (fault === "hello-extra") hello.moltbot = { user };
    send(conn, { type: "res", id: frame.id, ok: true, payload: hello });
    // One tick at once, so that even a short scenario sees (and validates) one.
    tick(conn);
    conn.timer = setInterval(() => tick(conn), tickMs);
  }

  function agent(conn, frame) {
    const runId = frame.params?.idempotencyKey;
    const message = frame.params?.message;
    if (typeof runId !== "string" || typeof message !== "string") {
      return send(conn, { type: "res", id: frame.id, ok: false, error: { code: "INVALID_REQUEST", message: "agent needs message and idempotencyKey" } });
    }
    send(conn, { type: "res", id: frame.id, ok: true, payload: { runId, status: "accepted", acceptedAt: Date.now() } });
    const audience = [...conns].filter((c) => c.user && (fault === "leak" || c.user === conn.user));
    const sessionKey = `agent:main:${conn.user}`;
    let runSeq = 0;
    const agentEvent = (stream, data) => {
      runSeq += 1;
      const payload = { runId, seq: runSeq, stream, ts: Date.now(), data };
      for (const c of audience) event(c, "agent", payload);
    };
    const chatEvent = (fields) => {
      runSeq += 1;
      const payload = { runId, sessionKey, seq: runSeq, ...fields };
      for (const c of audience) event(c, "chat", payload);
    };
    agentEvent("lifecycle", { phase: "start" });
    let text = "";
    for (const delta of ["Hello", " from", " the mock"]) {
      text += delta;
      const shown = fault === "text-not-cumulative" ? delta : text;
      agentEvent("assistant", { text: shown, delta });
      chatEvent(fault === "chat-delta-without-text" ? { state: "delta" } : { state: "delta", deltaText: delta });
    }
    chatEvent({ state: "final", message: { role: "assistant", content: [{ type: "text", text }] } });
    agentEvent("lifecycle", { phase: "end" });
    send(conn, { type: "res", id: frame.id, ok: true, payload: { runId, status: "ok", summary: "completed", result: { payloads: [{ text }] } } });
  }

  wss.on("connection", (ws) => {
    const conn = { ws, seq: 0, user: null, timer: null };
    conns.add(conn);
    ws.on("close", () => {
      clearInterval(conn.timer);
      conns.delete(conn);
    });
    send(conn, { type: "event", event: "connect.challenge", payload: { nonce: randomUUID(), ts: Date.now() } });
    ws.on("message", (data) => {
      let frame;
      try {
        frame = JSON.parse(data.toString("utf8"));
      } catch {
        return ws.close(1008, "not JSON");
      }
      if (!conn.user) return connect(conn, frame);
      const reply = (payload) => send(conn, { type: "res", id: frame.id, ok: true, payload });
      switch (frame.method) {
        case "health":
          return reply({ ok: true, workerId: `mock-${conn.user}` });
        case "status":
          return reply({ user: conn.user });
        case "sessions.list":
          return reply({ sessions: [] });
        case "chat.history":
          return reply({ messages: [] });
        case "agent":
          return agent(conn, frame);
        default:
          return send(conn, { type: "res", id: frame.id, ok: false, error: { code: "INVALID_REQUEST", message: `unknown method ${frame.method}` } });
      }
    });
  });

  return {
    url: `ws://127.0.0.1:${wss.address().port}/`,
    close: () =>
      new Promise((resolve) => {
        for (const c of conns) c.ws.terminate();
        wss.close(resolve);
      }),
  };
}
