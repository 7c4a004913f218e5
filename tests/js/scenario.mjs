// Drives one scenario against a gateway with the reference OpenClaw client and prints one
// JSON line: {scenario, ok, problems, violations, ...what was seen}. `problems` are failed
// expectations of the scenario itself; `violations` are frames that break the schema or the
// protocol (with the frame and the ajv errors). The Rust test asserts on the rest.
//
// Usage: node scenario.mjs SCENARIO --url ws://127.0.0.1:PORT/ [options]
//   health   --token T [--methods health,status,...]   connect, call each method
//   agent    --token T [--message M]                   a two-stage agent run with expectFinal
//   fanout   --token T --other-token U [--clients N]   N clients of T's user see the run one of
//                                                      them starts, U's client none of it (and
//                                                      the reverse for a run of U's)
//   reject   --token T [--min-protocol A --max-protocol B]
//                                                      a refused connect, through the client and
//                                                      through a raw socket
// Exits 0 whenever it printed its line (even for failures: the line says what failed).
import { randomUUID } from "node:crypto";
import { parseArgs } from "node:util";
import { ObservedClient, describeError, rawConnect, rawConnectParams, withDeadline } from "./lib/client.mjs";

const { positionals, values: args } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string" },
    token: { type: "string" },
    "other-token": { type: "string" },
    clients: { type: "string", default: "2" },
    methods: { type: "string", default: "health" },
    message: { type: "string", default: "hello from the OpenClaw reference client" },
    "min-protocol": { type: "string" },
    "max-protocol": { type: "string" },
  },
});

const opened = [];
function client(label, opts) {
  const c = new ObservedClient(label, { url: args.url, ...opts });
  opened.push(c);
  return c.start();
}

function need(name) {
  if (!args[name]) throw new Error(`--${name} is required`);
  return args[name];
}

// Params of the read methods `health` may call: as the schema's *Params definitions require.
// `health` gets none at all: `openclaw gateway health` sends none, so a gateway must cope.
const READ_PARAMS = { health: undefined, "chat.history": { sessionKey: "main" } };

const num = (v) => (v === undefined ? undefined : Number(v));

/** What a client needs to see of hello-ok to work, plus the protocol doc's promises. */
function checkHello(hello, problems, label) {
  if (hello.type !== "hello-ok") problems.push(`${label}: hello type ${hello.type}`);
  if (hello.protocol !== 4) problems.push(`${label}: hello protocol ${hello.protocol}, want 4`);
  if (!hello.server?.connId) problems.push(`${label}: hello-ok without server.connId`);
  if (!(hello.policy?.tickIntervalMs > 0)) problems.push(`${label}: no policy.tickIntervalMs`);
  for (const m of ["health", "agent"]) {
    if (!hello.features?.methods?.includes(m)) problems.push(`${label}: features.methods lacks ${m}`);
  }
}

function helloSummary(hello) {
  return {
    protocol: hello.protocol,
    server: hello.server,
    features: hello.features,
    auth: hello.auth,
    policy: hello.policy,
    snapshot: hello.snapshot,
  };
}

/**
 * The events of run `runId` as one client saw them, and what is wrong with them: a lifecycle
 * start first and end last, assistant text cumulative (each text extends the previous by its
 * delta), run seq increasing, one chat `final` after any deltas.
 */
function analyseRun(events, runId, label) {
  const problems = [];
  const agent = events.filter((e) => e.event === "agent" && e.payload?.runId === runId).map((e) => e.payload);
  const chat = events.filter((e) => e.event === "chat" && e.payload?.runId === runId).map((e) => e.payload);
  if (agent.length === 0) problems.push(`${label}: no agent event for run ${runId}`);
  else {
    const first = agent[0];
    const last = agent[agent.length - 1];
    if (first.stream !== "lifecycle" || first.data?.phase !== "start") {
      problems.push(`${label}: first agent event is ${first.stream}/${first.data?.phase}, want lifecycle/start`);
    }
    if (last.stream !== "lifecycle" || last.data?.phase !== "end") {
      problems.push(`${label}: last agent event is ${last.stream}/${last.data?.phase}, want lifecycle/end`);
    }
  }
  for (let i = 1; i < agent.length; i++) {
    if (!(agent[i].seq > agent[i - 1].seq)) {
      problems.push(`${label}: agent event seq ${agent[i].seq} after ${agent[i - 1].seq}`);
    }
  }
  let text = "";
  let assistantEvents = 0;
  for (const a of agent.filter((x) => x.stream === "assistant")) {
    assistantEvents++;
    const t = a.data?.text;
    if (typeof t !== "string") {
      problems.push(`${label}: assistant event without data.text`);
      continue;
    }
    if (!t.startsWith(text)) problems.push(`${label}: assistant text ${JSON.stringify(t)} does not extend ${JSON.stringify(text)}`);
    if (typeof a.data.delta === "string" && t !== text + a.data.delta) {
      problems.push(`${label}: assistant text ${JSON.stringify(t)} is not ${JSON.stringify(text)} + delta ${JSON.stringify(a.data.delta)}`);
    }
    text = t;
  }
  if (assistantEvents === 0 || text === "") problems.push(`${label}: no assistant text for run ${runId}`);
  for (let i = 1; i < chat.length; i++) {
    if (!(chat[i].seq > chat[i - 1].seq)) problems.push(`${label}: chat event seq ${chat[i].seq} after ${chat[i - 1].seq}`);
  }
  const finals = chat.filter((c) => c.state === "final");
  if (finals.length !== 1) problems.push(`${label}: ${finals.length} chat final events for run ${runId}, want 1`);
  else if (chat[chat.length - 1].state !== "final") problems.push(`${label}: a chat event after the final one`);
  return {
    problems,
    text,
    agent: agent.map((a) => ({ seq: a.seq, stream: a.stream, data: a.data })),
    chat: chat.map((c) => ({ seq: c.seq, state: c.state, sessionKey: c.sessionKey, deltaText: c.deltaText })),
  };
}

/** True once `c` has seen run `runId` end (lifecycle end or error). */
const runEnded = (c, runId) =>
  c.runEvents(runId).some((e) => e.event === "agent" && e.payload.stream === "lifecycle" && ["end", "error"].includes(e.payload.data?.phase));

/** Starts an agent run on `c` and waits for its final answer and its end event. */
async function agentRun(c, message, problems) {
  const runId = `moltbot-test-${randomUUID()}`;
  let accepted = null;
  let acceptedBeforeFinal = false;
  let final;
  let error;
  try {
    final = await withDeadline(
      c.request("agent", { message, idempotencyKey: runId }, {
        expectFinal: true,
        onAccepted: (p) => {
          accepted = p;
          acceptedBeforeFinal = true;
        },
      }),
      `${c.label}: the final agent response`,
    );
  } catch (e) {
    error = describeError(e);
    problems.push(`${c.label}: agent request failed: ${JSON.stringify(error)}`);
  }
  if (!accepted) problems.push(`${c.label}: no accepted response before the final one`);
  else {
    if (accepted.runId !== runId) problems.push(`${c.label}: accepted runId ${accepted.runId}, want the idempotencyKey ${runId}`);
    if (accepted.status !== "accepted") problems.push(`${c.label}: accepted status ${accepted.status}`);
    if (typeof accepted.acceptedAt !== "number") problems.push(`${c.label}: accepted without acceptedAt`);
  }
  if (final !== undefined) {
    if (final?.runId !== undefined && final.runId !== runId) problems.push(`${c.label}: final runId ${final.runId}, want ${runId}`);
    await c.until(`the end of run ${runId}`, () => runEnded(c, runId)).catch((e) => problems.push(e.message));
  }
  return { runId, accepted, acceptedBeforeFinal, final, error };
}

const scenarios = {
  async health(problems) {
    const a = client("a", { token: need("token") });
    const hello = await a.connected();
    checkHello(hello, problems, "a");
    const results = {};
    for (const method of args.methods.split(",").filter(Boolean)) {
      try {
        results[method] = { ok: true, payload: await a.request(method, method in READ_PARAMS ? READ_PARAMS[method] : {}) };
      } catch (e) {
        results[method] = { ok: false, error: describeError(e) };
        problems.push(`${method} failed: ${JSON.stringify(describeError(e))}`);
      }
    }
    return { hello: helloSummary(hello), results };
  },

  async agent(problems) {
    const a = client("a", { token: need("token") });
    checkHello(await a.connected(), problems, "a");
    const run = await agentRun(a, args.message, problems);
    const seen = analyseRun(a.events, run.runId, "a");
    problems.push(...seen.problems);
    const foreign = a.events.filter((e) => e.payload?.runId !== undefined && e.payload.runId !== run.runId);
    if (foreign.length) problems.push(`a: events of other runs: ${JSON.stringify(foreign.slice(0, 3))}`);
    return { run, events: { agent: seen.agent, chat: seen.chat }, text: seen.text };
  },

  async fanout(problems) {
    const n = Number(args.clients);
    if (!(n >= 2)) throw new Error("--clients must be at least 2");
    // One at a time, so that a gateway spreading connections over its cores in turn puts
    // consecutive ones on different cores.
    const same = [];
    for (let i = 0; i < n; i++) {
      const c = client(`a${i}`, { token: need("token") });
      checkHello(await c.connected(), problems, c.label);
      same.push(c);
    }
    const other = client("b", { token: need("other-token") });
    checkHello(await other.connected(), problems, "b");

    const runA = await agentRun(same[0], args.message, problems);
    const seenBy = {};
    for (const c of same) {
      await c.until(`the end of run ${runA.runId}`, () => runEnded(c, runA.runId)).catch((e) => problems.push(e.message));
      const seen = analyseRun(c.events, runA.runId, c.label);
      problems.push(...seen.problems);
      seenBy[c.label] = { text: seen.text, agentEvents: seen.agent.length, chatEvents: seen.chat.length };
    }
    const texts = new Set(Object.values(seenBy).map((s) => s.text));
    if (texts.size !== 1) problems.push(`the clients of one user saw different texts: ${JSON.stringify(seenBy)}`);

    // The other user's run comes after, on the same gateway: had the first run's events leaked
    // to that user's connection, they would have been delivered before that user's own.
    const runB = await agentRun(other, `${args.message} (other user)`, problems);
    const leakedToOther = other.runEvents(runA.runId).length;
    if (leakedToOther) problems.push(`b saw ${leakedToOther} events of the other user's run`);
    const otherSeen = analyseRun(other.events, runB.runId, "b");
    problems.push(...otherSeen.problems);
    const leakedToSame = Object.fromEntries(same.map((c) => [c.label, c.runEvents(runB.runId).length]));
    for (const [label, count] of Object.entries(leakedToSame)) {
      if (count) problems.push(`${label} saw ${count} events of the other user's run`);
    }
    return {
      connIds: Object.fromEntries([...same, other].map((c) => [c.label, c.hello?.server?.connId])),
      runA: { runId: runA.runId, seenBy },
      runB: { runId: runB.runId, text: otherSeen.text },
      leakedToOther,
      leakedToSame,
    };
  },

  async reject(problems) {
    const token = need("token");
    const min = num(args["min-protocol"]);
    const max = num(args["max-protocol"]);
    const c = client("client", { token, minProtocol: min, maxProtocol: max });
    await c.until("the first close", () => c.closes.length > 0).catch((e) => problems.push(e.message));
    // It would reconnect (after 1 s) unless the error's details.code makes it pause.
    c.stop();
    if (c.hello) problems.push("the client connected");
    const raw = await rawConnect("raw", args.url, rawConnectParams(token, min ?? 4, max ?? 4));
    if (!raw.response) problems.push("raw: no response to connect");
    if (!raw.close) problems.push(`raw: the server did not close the connection (${raw.error})`);
    return {
      client: {
        connectError: c.connectErrors[0],
        close: c.closes[0],
        reconnectPaused: c.reconnectPaused,
      },
      raw: { response: raw.response, close: raw.close, error: raw.error },
      rawFrames: raw.frames,
    };
  },
};

async function main() {
  const name = positionals[0];
  const result = { scenario: name, ok: false, problems: [] };
  let rawFrames = [];
  try {
    if (!scenarios[name]) throw new Error(`unknown scenario ${name}; one of ${Object.keys(scenarios).join(", ")}`);
    need("url");
    const out = await scenarios[name](result.problems);
    if (out.rawFrames) {
      rawFrames = [out.rawFrames];
      delete out.rawFrames;
    }
    Object.assign(result, out);
  } catch (e) {
    result.problems.push(`crash: ${e.stack ?? e}`);
  }
  for (const c of opened) c.stop();
  result.clients = opened.map((c) => c.report());
  result.frames = [...opened.map((c) => c.validator.summary()), ...rawFrames];
  result.violations = result.frames.flatMap((f) => f.violations);
  for (const f of result.frames) delete f.violations;
  // A hook that saw nothing would make a clean report meaningless.
  for (const f of result.frames) {
    if (f.framesIn === 0) result.problems.push(`${f.connection}: the validator saw no frame from the server`);
  }
  result.ok = result.problems.length === 0 && result.violations.length === 0;
  console.log(JSON.stringify(result));
  process.exit(0);
}

await main();
