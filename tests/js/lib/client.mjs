// The reference client (`GatewayClient` of `@openclaw/gateway-client`) with every frame it
// sends and receives passed through a FrameValidator, and what it reports recorded: hello-ok,
// events, connect errors, closes, seq gaps.
//
// Also a raw probe on Node's own WebSocket, for what the reference client hides: it closes
// the socket itself (1008 "connect failed") as soon as `connect` fails, so the close code it
// reports may be its own echoed back rather than the one the server chose.
import { importDep } from "./deps.mjs";
import { FrameValidator } from "./validator.mjs";

const { GatewayClient } = await importDep("@openclaw/gateway-client");

/** How long any awaited condition may take: generous, for a loaded 2-core machine. */
export const DEADLINE_MS = Number(process.env.MOLTBOT_TEST_JS_DEADLINE_MS || 60000);

/** The fields of an error worth reporting (GatewayClientRequestError carries code/details). */
export function describeError(err) {
  if (!(err instanceof Error)) return { message: String(err) };
  const out = { name: err.name, message: err.message };
  for (const k of ["code", "gatewayCode", "details", "retryable", "retryAfterMs"]) {
    if (err[k] !== undefined) out[k] = err[k];
  }
  return out;
}

/** Resolves when `cond()` holds, re-checked whenever `subscribe` signals; rejects at the deadline. */
function waitFor(subscribe, what, cond, ms = DEADLINE_MS) {
  return new Promise((resolve, reject) => {
    let done = false;
    let unsubscribe = () => {};
    const timer = setTimeout(() => {
      if (done) return;
      done = true;
      unsubscribe();
      reject(new Error(`timed out after ${ms} ms waiting for ${what}`));
    }, ms);
    const check = () => {
      if (done) return;
      let v;
      try {
        v = cond();
      } catch (e) {
        done = true;
        clearTimeout(timer);
        unsubscribe();
        reject(e);
        return;
      }
      if (v) {
        done = true;
        clearTimeout(timer);
        unsubscribe();
        resolve(v);
      }
    };
    unsubscribe = subscribe(check);
    check();
  });
}

/** A promise with a deadline. */
export function withDeadline(promise, what, ms = DEADLINE_MS) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

export class ObservedClient {
  /**
   * `opts`: url, token, and optionally scopes, minProtocol, maxProtocol, clientName, mode.
   */
  constructor(label, opts) {
    this.label = label;
    this.validator = new FrameValidator(label);
    this.hello = null;
    this.events = [];
    this.connectErrors = [];
    this.closes = [];
    this.gaps = [];
    this.reconnectPaused = null;
    this.log = [];
    this.listeners = new Set();
    const note = (f) => (...args) => {
      f(...args);
      for (const l of [...this.listeners]) l();
    };
    this.client = new GatewayClient({
      url: opts.url,
      token: opts.token,
      scopes: opts.scopes ?? ["operator.read", "operator.write"],
      minProtocol: opts.minProtocol,
      maxProtocol: opts.maxProtocol,
      clientName: opts.clientName,
      mode: opts.mode,
      clientVersion: "moltbot-tests",
      // A request of ours must fail at our deadline, not the client's 30 s default, so the
      // scenario reports the hang rather than a CLIENT_TIMEOUT that looks like a server error.
      requestTimeoutMs: DEADLINE_MS,
      hostDeps: {
        logError: (m) => this.log.push(`error: ${m}`),
        logDebug: (m) => this.log.push(`debug: ${m}`),
      },
      onHelloOk: note((h) => {
        this.hello = h;
      }),
      onEvent: note((e) => this.events.push(e)),
      onConnectError: note((e) => this.connectErrors.push(describeError(e))),
      onClose: note((code, reason, info) =>
        this.closes.push({
          code,
          reason,
          phase: info?.phase,
          connectError: info?.connectError ? describeError(info.connectError) : undefined,
        }),
      ),
      onGap: note((g) => this.gaps.push(g)),
      onReconnectPaused: note((p) => {
        this.reconnectPaused = p;
      }),
    });
    this.hookFrames();
  }

  // The client keeps its socket private; its protocol layer asks `this.createSocket(handlers)`
  // for each connection attempt, so wrapping that method sees every frame of every attempt,
  // before the client does. Fail loudly if a client release renames it: validating nothing
  // would pass everything.
  hookFrames() {
    const original = this.client.createSocket;
    if (typeof original !== "function") {
      throw new Error("GatewayClient has no createSocket method to hook: the validator would see no frame");
    }
    const validator = this.validator;
    this.client.createSocket = function (handlers) {
      const socket = original.call(this, {
        ...handlers,
        message: (data) => {
          validator.incoming(data);
          handlers.message(data);
        },
      });
      return {
        ...socket,
        send: (data) => {
          validator.outgoing(data);
          socket.send(data);
        },
      };
    };
  }

  until(what, cond, ms) {
    return waitFor(
      (l) => {
        this.listeners.add(l);
        return () => this.listeners.delete(l);
      },
      `${this.label}: ${what}`,
      cond,
      ms,
    );
  }

  start() {
    this.client.start();
    return this;
  }

  /** Waits for hello-ok; throws with the connect error / close if the connection failed. */
  async connected() {
    await this.until("hello-ok or a close", () => this.hello || this.closes.length > 0);
    if (!this.hello) {
      throw new Error(
        `${this.label} did not connect: ${JSON.stringify({ errors: this.connectErrors, closes: this.closes })}`,
      );
    }
    return this.hello;
  }

  request(method, params, opts) {
    return this.client.request(method, params, opts);
  }

  /** Events of run `runId` (agent and chat events carry it in their payload). */
  runEvents(runId) {
    return this.events.filter((e) => e.payload?.runId === runId);
  }

  stop() {
    this.client.stop();
  }

  /** What the Rust test sees about this connection. */
  report() {
    return {
      label: this.label,
      connId: this.hello?.server?.connId,
      connectErrors: this.connectErrors,
      closes: this.closes,
      gaps: this.gaps,
      reconnectPaused: this.reconnectPaused,
      log: this.log.slice(0, 20),
    };
  }
}

/**
 * A hand-made handshake on Node's WebSocket: waits for connect.challenge, sends `connect`
 * with `params`, and records the response and the close the server chooses (it never closes
 * first itself, until the deadline).
 */
export async function rawConnect(label, url, params) {
  const validator = new FrameValidator(label);
  const ws = new WebSocket(url);
  const out = { label, challenge: null, response: null, close: null, error: null };
  const listeners = new Set();
  const notify = () => {
    for (const l of [...listeners]) l();
  };
  ws.addEventListener("message", (ev) => {
    const text = typeof ev.data === "string" ? ev.data : Buffer.from(ev.data).toString("utf8");
    validator.incoming(text);
    let frame;
    try {
      frame = JSON.parse(text);
    } catch {
      return notify();
    }
    if (frame.type === "event" && frame.event === "connect.challenge" && !out.challenge) {
      out.challenge = frame.payload;
      const req = JSON.stringify({ type: "req", id: "raw-connect-1", method: "connect", params });
      validator.outgoing(req);
      ws.send(req);
    } else if (frame.type === "res" && frame.id === "raw-connect-1") {
      out.response = frame;
    }
    notify();
  });
  ws.addEventListener("error", (ev) => {
    out.error = ev.message ?? String(ev.error ?? "websocket error");
    notify();
  });
  ws.addEventListener("close", (ev) => {
    out.close = { code: ev.code, reason: ev.reason, wasClean: ev.wasClean };
    notify();
  });
  try {
    await waitFor(
      (l) => {
        listeners.add(l);
        return () => listeners.delete(l);
      },
      `${label}: the server closing the connection`,
      () => out.close !== null,
    );
  } catch (e) {
    out.error = out.error ?? e.message;
    ws.close();
  }
  return { ...out, frames: validator.summary() };
}

/** The connect params of the raw probe: a `test` client with a token. */
export function rawConnectParams(token, minProtocol = 4, maxProtocol = 4) {
  return {
    minProtocol,
    maxProtocol,
    client: { id: "test", version: "moltbot-tests", platform: process.platform, mode: "test" },
    role: "operator",
    scopes: ["operator.read"],
    auth: { token },
  };
}
