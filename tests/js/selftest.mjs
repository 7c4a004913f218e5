// Tests the scenarios and the frame validator against mock-gateway.mjs: each scenario passes
// against a well-behaved mock, and each injected fault (a frame the schema forbids, a seq gap,
// a leak to another user...) makes the scenario report it. Prints one JSON line
// {ok, cases:[{name, ok, why, result}]}; exits 0 when it printed it.
import { spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { startMock } from "./mock-gateway.mjs";

const here = dirname(fileURLToPath(import.meta.url));
const USERS = { "mbt_alice-token": "alice", "mbt_bob-token": "bob" };
const DEADLINE_MS = Number(process.env.MOLTBOT_TEST_JS_DEADLINE_MS || 60000);

function runScenario(args) {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [join(here, "scenario.mjs"), ...args], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    let out = "";
    let err = "";
    child.stdout.on("data", (d) => (out += d));
    child.stderr.on("data", (d) => (err += d));
    const timer = setTimeout(() => child.kill("SIGKILL"), DEADLINE_MS * 3);
    child.on("error", reject);
    child.on("close", (code) => {
      clearTimeout(timer);
      const line = out.trim().split("\n").pop();
      try {
        resolve(JSON.parse(line));
      } catch {
        reject(new Error(`scenario ${args[0]} exited ${code} without a JSON line: ${out}\n${err}`));
      }
    });
  });
}

const violated = (r, re) => r.violations.some((v) => re.test(v.what));
const problem = (r, re) => r.problems.some((p) => re.test(p));

// Each case: the mock's fault, the scenario's arguments, and what must hold of the result
// (a string saying what is wrong, or null).
const cases = [
  ["health, clean", "none", ["health", "--token", "mbt_alice-token", "--methods", "health,status,sessions.list,chat.history"], (r) =>
    !r.ok ? "not ok"
    : r.frames[0].checkedBy["result connect"] !== "HelloOk" ? "hello-ok not checked as HelloOk"
    : r.frames[0].checkedBy["event tick"] !== "TickEvent" ? "tick not checked as TickEvent"
    : r.results.health.payload.workerId !== "mock-alice" ? "wrong health payload"
    : null],
  ["agent, clean", "none", ["agent", "--token", "mbt_alice-token"], (r) =>
    !r.ok ? "not ok"
    : r.text !== "Hello from the mock" ? `text ${r.text}`
    : r.frames[0].checkedBy["event agent"] !== "AgentEvent" || r.frames[0].checkedBy["event chat"] !== "ChatEvent" ? "run events not checked"
    : r.run.final?.status !== "ok" || !r.run.acceptedBeforeFinal ? "no two-stage answer"
    : null],
  ["fanout, clean", "none", ["fanout", "--token", "mbt_alice-token", "--other-token", "mbt_bob-token", "--clients", "3"], (r) =>
    !r.ok ? "not ok" : Object.keys(r.runA.seenBy).length !== 3 ? "not 3 clients" : null],
  ["reject, bad token", "none", ["reject", "--token", "mbt_nobody"], (r) =>
    !r.ok ? "not ok"
    : r.raw.close?.code !== 1008 ? `raw close ${JSON.stringify(r.raw.close)}`
    : r.client.connectError?.details?.code !== "AUTH_TOKEN_MISMATCH" ? `client error ${JSON.stringify(r.client.connectError)}`
    : r.client.reconnectPaused?.detailCode !== "AUTH_TOKEN_MISMATCH" ? "the client did not pause reconnecting"
    : null],
  ["reject, protocol mismatch", "none", ["reject", "--token", "mbt_alice-token", "--min-protocol", "5", "--max-protocol", "5"], (r) =>
    !r.ok ? "not ok"
    : r.raw.close?.code !== 1002 ? `raw close ${JSON.stringify(r.raw.close)}`
    : r.client.connectError?.details?.code !== "PROTOCOL_MISMATCH" ? `client error ${JSON.stringify(r.client.connectError)}`
    : null],
  ["hello-ok with a field HelloOk forbids", "hello-extra", ["health", "--token", "mbt_alice-token"], (r) =>
    violated(r, /not a valid HelloOk/) ? null : "not reported"],
  ["tick with a fractional ts", "tick-float", ["health", "--token", "mbt_alice-token"], (r) =>
    violated(r, /not a valid TickEvent/) ? null : "not reported"],
  ["a seq gap", "seq-gap", ["agent", "--token", "mbt_alice-token"], (r) =>
    !violated(r, /must be contiguous/) ? "validator did not report it"
    : !r.clients[0].gaps.length ? "the client's onGap was not recorded"
    : null],
  ["chat delta without deltaText", "chat-delta-without-text", ["agent", "--token", "mbt_alice-token"], (r) =>
    violated(r, /not a valid ChatEvent/) ? null : "not reported"],
  ["error without a code", "error-without-code", ["reject", "--token", "mbt_nobody"], (r) =>
    violated(r, /not a valid GatewayFrame|not a valid ResponseFrame/) ? null : "not reported"],
  ["assistant text not cumulative", "text-not-cumulative", ["agent", "--token", "mbt_alice-token"], (r) =>
    problem(r, /does not extend/) ? null : "not reported"],
  ["a run's events reach another user", "leak", ["fanout", "--token", "mbt_alice-token", "--other-token", "mbt_bob-token"], (r) =>
    problem(r, /b saw \d+ events of the other user's run/) && problem(r, /saw \d+ events of the other user's run/) ? null : "not reported"],
];

const results = [];
for (const [name, fault, args, judge] of cases) {
  const mock = await startMock({ users: USERS, fault });
  try {
    const r = await runScenario([...args, "--url", mock.url]);
    const why = judge(r);
    results.push({ name, ok: why === null, why, result: why === null ? undefined : r });
  } catch (e) {
    results.push({ name, ok: false, why: `crash: ${e.stack ?? e}` });
  } finally {
    await mock.close();
  }
}
console.log(JSON.stringify({ ok: results.every((c) => c.ok), cases: results }));
process.exit(0);
