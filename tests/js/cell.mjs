// The cell mode through the reference client: two users, each on a real OpenClaw gateway (a
// "cell") of their own behind one moltbot gateway, and a third who finds every cell taken.
// Prints one JSON line with what each step saw; tests/cell_mode.rs asserts on it.
//
// Usage: node cell.mjs --url ws://127.0.0.1:PORT/ --http http://127.0.0.1:PORT
//          --operator TOKEN --alice TOKEN --bob TOKEN --carol TOKEN
//
// Steps: alice and bob connect and call health, status and sessions.list (their cells start
// on the way); alice runs `agent` in a session of her own (no model key: the cell's error comes
// back); bob cannot see that session; alice's cell is killed (SIGKILL) while she waits in
// `agent.wait`: she gets UNAVAILABLE, then a fresh cell serves her with the same sessions; bob
// keeps his cell and connection throughout; alice disconnects, her cell stops when idle, and
// starts again when she comes back; carol gets USER_LIMIT. The gateway's idle timeout must be
// short (seconds) and bob stays connected, so his cell must not stop.
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { DEADLINE_MS, ObservedClient, describeError, withDeadline } from "./lib/client.mjs";

const { values: args } = parseArgs({
  options: {
    url: { type: "string" },
    http: { type: "string" },
    operator: { type: "string" },
    alice: { type: "string" },
    bob: { type: "string" },
    carol: { type: "string" },
  },
});
for (const k of ["url", "http", "operator", "alice", "bob", "carol"]) {
  if (!args[k]) throw new Error(`--${k} is required`);
}

/** A cell's start takes 12–30 s alone, longer on a loaded machine; a restart adds the backoff. */
const CELL_MS = Math.max(DEADLINE_MS, 240000);
const SESSION = "agent:main:alice-private";

const report = { steps: [], problems: [] };
const opened = [];
function client(label, token) {
  const c = new ObservedClient(label, { url: args.url, token });
  opened.push(c);
  return c.start();
}
const problem = (p) => report.problems.push(p);

async function status() {
  const r = await fetch(`${args.http}/status`, {
    headers: { authorization: `Bearer ${args.operator}` },
  });
  if (!r.ok) throw new Error(`/status: ${r.status}`);
  return r.json();
}

/** The user's slot (`worker-N`), as the gateway's routing table says. */
async function slotOf(user) {
  const r = await fetch(`${args.http}/v1/users/${user}/worker`, {
    headers: { authorization: `Bearer ${args.operator}` },
  });
  const text = (await r.text()).trim();
  try {
    const v = JSON.parse(text);
    return v.workerId ?? v.worker ?? text;
  } catch {
    return text;
  }
}

async function cellOf(user) {
  const slot = await slotOf(user);
  const w = (await status()).workers.find((w) => w.workerId === slot);
  return { slot, worker: w, cell: w?.cell };
}

/** Polls the status until `cond(cell)` holds for `user`'s slot. */
async function untilCell(user, what, cond) {
  const deadline = Date.now() + CELL_MS;
  for (;;) {
    const c = await cellOf(user);
    if (c.cell && cond(c.cell)) return c;
    if (Date.now() > deadline) throw new Error(`${user}: timed out waiting for the cell to be ${what}: ${JSON.stringify(c)}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Calls `method` until it answers, as a client that honours `retryAfterMs` does: the answers
 * UNAVAILABLE before it (a cell starting, a worker restarting) are returned with the result.
 */
async function untilOk(c, method, params) {
  const refusals = [];
  const deadline = Date.now() + CELL_MS;
  for (;;) {
    try {
      const payload = await c.request(method, params, { timeoutMs: CELL_MS });
      return { payload, refusals };
    } catch (e) {
      const err = describeError(e);
      if (err.code !== "UNAVAILABLE" || Date.now() > deadline) {
        throw new Error(`${c.label} ${method}: ${JSON.stringify(err)} after ${JSON.stringify(refusals)}`);
      }
      refusals.push(err);
      await new Promise((r) => setTimeout(r, Math.min(Math.max(err.retryAfterMs ?? 200, 50), 1000)));
    }
  }
}

const sessionKeys = (list) => (list?.sessions ?? []).map((s) => s.key);

async function main() {
  const alice = client("alice", args.alice);
  const bob = client("bob", args.bob);
  await Promise.all([alice.connected(), bob.connected()]);

  // 1. Each user's first request starts their cell; both answer as real OpenClaw does.
  const [ha, hb] = await Promise.all([untilOk(alice, "health"), untilOk(bob, "health")]);
  report.health = { alice: ha.payload, bob: hb.payload, waited: { alice: ha.refusals, bob: hb.refusals } };
  report.status = {
    alice: (await untilOk(alice, "status")).payload,
    bob: (await untilOk(bob, "status")).payload,
  };
  report.sessionsBefore = {
    alice: (await untilOk(alice, "sessions.list", {})).payload,
    bob: (await untilOk(bob, "sessions.list", {})).payload,
  };
  report.cells = { alice: await cellOf("alice"), bob: await cellOf("bob") };
  report.steps.push("started");

  // 2. An agent run in alice's own session: no model key, so the cell's error, relayed.
  const runId = randomUUID();
  try {
    const r = await alice.request(
      "agent",
      { message: "hello from alice", idempotencyKey: runId, sessionKey: SESSION },
      { expectFinal: true, timeoutMs: CELL_MS },
    );
    report.agent = { ok: true, payload: r };
  } catch (e) {
    report.agent = { ok: false, error: describeError(e) };
  }
  report.agent.runEvents = {
    alice: alice.events.filter((e) => e.payload?.runId === runId).map((e) => e.event),
    bob: bob.events.filter((e) => e.payload?.runId === runId).length,
  };
  report.sessionsAfterRun = {
    alice: sessionKeys((await untilOk(alice, "sessions.list", {})).payload),
    bob: sessionKeys((await untilOk(bob, "sessions.list", {})).payload),
  };
  try {
    const h = await bob.request("chat.history", { sessionKey: SESSION }, { timeoutMs: CELL_MS });
    report.bobReadsAliceHistory = { ok: true, messages: (h?.messages ?? []).length };
  } catch (e) {
    report.bobReadsAliceHistory = { ok: false, error: describeError(e) };
  }
  report.steps.push("agent");

  // 3. alice's cell dies (SIGKILL) while she waits in agent.wait. The `health` after it on the
  // same connection is answered only once the cell has the wait pending (one socket, in order).
  const before = await cellOf("alice");
  const bobBefore = await cellOf("bob");
  const wait = alice
    .request("agent.wait", { runId: `never-${randomUUID()}`, timeoutMs: 600000 }, { timeoutMs: CELL_MS })
    .then((r) => ({ ok: true, payload: r }), (e) => ({ ok: false, error: describeError(e) }));
  await untilOk(alice, "health");
  process.kill(before.cell.pid, "SIGKILL");
  report.killed = { pid: before.cell.pid, wait: await withDeadline(wait, "agent.wait after the kill", CELL_MS) };
  const back = await untilOk(alice, "health");
  report.afterKill = {
    refusals: back.refusals,
    sessions: sessionKeys((await untilOk(alice, "sessions.list", {})).payload),
    cell: await untilCell("alice", "ready", (c) => c.state === "ready" && c.pid),
  };
  report.bobDuringKill = {
    health: (await untilOk(bob, "health")).refusals,
    before: bobBefore.cell,
    after: (await cellOf("bob")).cell,
    closes: bob.closes,
  };
  report.steps.push("killed");

  // 4. alice leaves: her cell stops when idle (bob, connected, keeps his); she comes back.
  alice.stop();
  const stopped = await untilCell("alice", "stopped", (c) => c.state === "stopped");
  const bobWhileAliceIdle = await cellOf("bob");
  const alice2 = client("alice-again", args.alice);
  await alice2.connected();
  const again = await untilOk(alice2, "sessions.list", {});
  report.idle = {
    stopped: stopped.cell,
    bob: bobWhileAliceIdle.cell,
    sessions: sessionKeys(again.payload),
    waited: again.refusals,
    cell: await untilCell("alice", "ready", (c) => c.state === "ready" && c.pid),
  };
  report.steps.push("idle");

  // 5. Every cell is taken.
  const carol = client("carol", args.carol);
  await carol.connected();
  try {
    report.carol = { ok: true, payload: await carol.request("health", undefined, { timeoutMs: CELL_MS }) };
  } catch (e) {
    report.carol = { ok: false, error: describeError(e) };
  }
  report.steps.push("carol");
}

try {
  await main();
} catch (e) {
  problem(`${e?.stack ?? e}`);
}
for (const c of opened) c.stop();
report.clients = opened.map((c) => c.report());
report.frames = opened.map((c) => c.validator.summary());
// The payloads of events and answers are the cell's own, relayed intact: where the real
// OpenClaw adds fields its published schema does not have (its agent events carry agentId,
// sessionId, sessionKey), that is reported apart, not held against the gateway. Everything
// else (frames, seq, errors, hello-ok) is the gateway's and must be valid.
const cellsOwn = (v) =>
  v.kind === "schema" &&
  /^payload of /.test(v.what) &&
  (v.errors ?? []).length > 0 &&
  v.errors.every((e) => e.keyword === "additionalProperties" && e.instancePath === "");
const all = report.frames.flatMap((f) => f.violations);
report.violations = all.filter((v) => !cellsOwn(v));
report.cellExtensions = [
  ...new Set(all.filter(cellsOwn).flatMap((v) => v.errors.map((e) => `${v.what}: ${e.params?.additionalProperty}`))),
];
for (const f of report.frames) delete f.violations;
console.log(JSON.stringify(report));
process.exit(0);
