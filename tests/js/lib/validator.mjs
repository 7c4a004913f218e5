// Validates every frame of one WebSocket connection against `protocol.schema.json` of
// `@openclaw/gateway-protocol`, with ajv.
//
// How frames map to schema definitions (the schema has no table for it: its `methods` table
// holds only `since` and `scope`, so names follow the definitions' naming convention):
// - every frame: `GatewayFrame`, then `RequestFrame` / `ResponseFrame` / `EventFrame` by `type`;
// - the success response to `connect`: payload `HelloOk`; a failure's `error` is `ErrorShape`
//   (inside `ResponseFrame`);
// - a success response to method `a.b`: payload `ABResult` when the schema defines it (it
//   defines none for health, status, sessions.list, chat.history, agent or chat.send: those are
//   checked by the envelope only, and listed under `unchecked`);
// - an event `x.y`: payload `TickEvent`, `ShutdownEvent`, `AgentEvent`, `ChatEvent` for tick,
//   shutdown, agent, chat, else `XYEvent` when defined; `connect.challenge` has no definition,
//   so its payload is checked here against the protocol's description (nonce, ts);
// - requests we send: `RequestFrame` and params `ABParams` when defined (`ConnectParams`,
//   `AgentParams`...), which proves the scenario sends what the protocol allows.
// Besides the schema: event `seq` numbers must be contiguous on a connection, a response must
// answer a request we sent (once, except an `accepted` interim answer before the final one),
// and an `ok:false` response must carry its error.
import { readFileSync } from "node:fs";
import { requireDep, SCHEMA_PATH } from "./deps.mjs";

const Ajv = requireDep("ajv").default;

const schema = JSON.parse(readFileSync(SCHEMA_PATH, "utf8"));
// strict:false because the schema carries keywords ajv does not know (`discriminator` as a bare
// string, `x-openclaw-since`); they are annotations, not constraints.
const ajv = new Ajv({ strict: false, allErrors: true });
ajv.addSchema(schema);
const compiled = new Map();

/** The compiled validator of definition `name`, or null when the schema has no such one. */
export function definition(name) {
  if (!Object.hasOwn(schema.definitions, name)) return null;
  let v = compiled.get(name);
  if (!v) {
    v = ajv.getSchema(`${schema.$id}#/definitions/${name}`);
    if (!v) throw new Error(`ajv could not compile definition ${name}`);
    compiled.set(name, v);
  }
  return v;
}

const pascal = (name) =>
  name
    .split(/[.\-_:]/)
    .filter(Boolean)
    .map((p) => p[0].toUpperCase() + p.slice(1))
    .join("");

const EVENT_DEFINITIONS = {
  tick: "TickEvent",
  shutdown: "ShutdownEvent",
  agent: "AgentEvent",
  chat: "ChatEvent",
};

/** The definition of event `name`'s payload, or null. */
export function eventDefinition(name) {
  const d = EVENT_DEFINITIONS[name] ?? `${pascal(name)}Event`;
  return Object.hasOwn(schema.definitions, d) ? d : null;
}

/** The definition of method `name`'s params or result (`kind`), or null. */
export function methodDefinition(name, kind) {
  if (name === "connect" && kind === "Result") return "HelloOk";
  const d = `${pascal(name)}${kind}`;
  return Object.hasOwn(schema.definitions, d) ? d : null;
}

/** The methods the schema lists (its `methods` table: method → {since, scope}). */
export const METHODS = schema.methods;

const MAX_FRAME_TEXT = 4000;
const MAX_ERRORS = 20;

export class FrameValidator {
  constructor(label) {
    this.label = label;
    this.framesIn = 0;
    this.framesOut = 0;
    this.violations = [];
    // Request id → method, for requests still waiting for their (final) response.
    this.pending = new Map();
    this.lastSeq = null;
    // What validated which payloads: "event tick" → "TickEvent"; and what had no definition.
    this.checkedBy = {};
    this.unchecked = new Set();
  }

  fail(direction, kind, what, text, errors) {
    this.violations.push({
      connection: this.label,
      direction,
      kind,
      what,
      errors: errors ? errors.slice(0, MAX_ERRORS) : undefined,
      frame: text.length > MAX_FRAME_TEXT ? `${text.slice(0, MAX_FRAME_TEXT)}…` : text,
    });
  }

  check(direction, name, value, text, what) {
    const v = definition(name);
    if (v(value)) return true;
    this.fail(direction, "schema", `${what} is not a valid ${name}`, text, v.errors);
    return false;
  }

  parse(direction, text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      this.fail(direction, "protocol", `not JSON: ${e.message}`, text);
      return undefined;
    }
  }

  /** A frame this side sends. */
  outgoing(text) {
    this.framesOut += 1;
    const frame = this.parse("out", text);
    if (frame === undefined) return;
    if (!this.check("out", "RequestFrame", frame, text, "request")) return;
    const params = methodDefinition(frame.method, "Params");
    if (params && frame.params !== undefined) {
      this.check("out", params, frame.params, text, `params of ${frame.method}`);
    }
    this.pending.set(frame.id, frame.method);
  }

  /** A frame the server sent. */
  incoming(text) {
    this.framesIn += 1;
    const frame = this.parse("in", text);
    if (frame === undefined) return;
    if (!this.check("in", "GatewayFrame", frame, text, "frame")) return;
    if (frame.type === "res") this.response(frame, text);
    else if (frame.type === "event") this.event(frame, text);
    else this.fail("in", "protocol", `the server sent a ${frame.type} frame`, text);
  }

  response(frame, text) {
    if (!this.check("in", "ResponseFrame", frame, text, "response")) return;
    const method = this.pending.get(frame.id);
    if (method === undefined) {
      this.fail("in", "protocol", `response to no pending request (id ${frame.id})`, text);
      return;
    }
    if (!frame.ok) {
      this.pending.delete(frame.id);
      if (!frame.error) this.fail("in", "protocol", "ok:false without an error", text);
      return;
    }
    if (frame.error) this.fail("in", "protocol", "ok:true with an error", text);
    // An interim `accepted` answer keeps the request open for its final answer (the reference
    // client does the same for expectFinal requests).
    const interim = frame.payload?.status === "accepted";
    if (!interim) this.pending.delete(frame.id);
    const result = methodDefinition(method, "Result");
    const key = `result ${method}${interim ? " (accepted)" : ""}`;
    if (result && !interim) {
      this.checkedBy[key] = result;
      this.check("in", result, frame.payload, text, `payload of the ${method} response`);
    } else {
      this.unchecked.add(key);
    }
  }

  event(frame, text) {
    if (!this.check("in", "EventFrame", frame, text, "event")) return;
    if (frame.seq !== undefined) {
      if (this.lastSeq !== null && frame.seq !== this.lastSeq + 1) {
        this.fail(
          "in",
          "protocol",
          `event seq ${frame.seq} after ${this.lastSeq} (must be contiguous)`,
          text,
        );
      }
      this.lastSeq = frame.seq;
    }
    const key = `event ${frame.event}`;
    if (frame.event === "connect.challenge") {
      this.checkedBy[key] = "protocol doc (no schema definition)";
      const p = frame.payload;
      const ok =
        p !== null &&
        typeof p === "object" &&
        typeof p.nonce === "string" &&
        p.nonce.trim() !== "" &&
        Number.isSafeInteger(p.ts) &&
        p.ts >= 0 &&
        Object.keys(p).every((k) => k === "nonce" || k === "ts");
      if (!ok) {
        this.fail("in", "protocol", "connect.challenge payload is not {nonce, ts}", text);
      }
      return;
    }
    const def = eventDefinition(frame.event);
    if (!def) {
      this.unchecked.add(key);
      return;
    }
    this.checkedBy[key] = def;
    this.check("in", def, frame.payload, text, `payload of event ${frame.event}`);
  }

  summary() {
    return {
      connection: this.label,
      framesIn: this.framesIn,
      framesOut: this.framesOut,
      checkedBy: this.checkedBy,
      unchecked: [...this.unchecked].sort(),
      violations: this.violations,
    };
  }
}
