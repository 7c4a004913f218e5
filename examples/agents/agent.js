#!/usr/bin/env node
// A moltbot agent in Node.js (no packages), for `worker_command`.
//
// Run a gateway with it:
//     moltbot gateway --worker-command "node examples/agents/agent.js"
//
// Each worker process starts one copy inside its sandbox (cwd = sandbox, MOLTBOT_* variables
// set) and talks to it over stdin/stdout in JSON Lines. This agent keeps a conversation file
// per user in $MOLTBOT_SESSIONS_DIR. A request sent with "stream": true gets its reply word by
// word as `agent` events first; OpenClaw RPC requests (type "rpc") are answered for `health`
// and `agent`.
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');

const WORKER_ID = process.env.MOLTBOT_WORKER_ID || 'worker-?';
const SESSIONS = process.env.MOLTBOT_SESSIONS_DIR || 'sessions';

// The gateway's file-name encoding of a user id: as is if plain, else ~base64url.
function safe(user) {
  if (/^[A-Za-z0-9_-]+$/.test(user)) return user;
  return '~' + Buffer.from(user, 'utf8').toString('base64url');
}

function send(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function ok(requestId, payload) {
  send({ type: 'response', response: { requestId, success: true, payload } });
}

function fail(requestId, errorCode, error, status = 400) {
  send({ type: 'response', response: { requestId, success: false, error, errorCode, status } });
}

// Sends `reply` word by word as OpenClaw `agent` events, between lifecycle start and end.
function streamReply(requestId, runId, reply) {
  let seq = 0;
  const agentEvent = (stream, data) => send({
    type: 'event', requestId, event: 'agent',
    payload: { runId, seq: ++seq, stream, ts: Date.now(), data },
  });
  const startedAt = Date.now();
  agentEvent('lifecycle', { phase: 'start', startedAt });
  let text = '';
  for (const delta of reply.split(/(?<=\S)(?=\s)/)) {
    text += delta;
    agentEvent('assistant', { text, delta });
  }
  agentEvent('lifecycle', { phase: 'end', startedAt, endedAt: Date.now() });
}

function historyPath(user) {
  return path.join(SESSIONS, safe(user) + '.jsonl');
}

function turns(user) {
  try {
    return fs.readFileSync(historyPath(user), 'utf8').split('\n').filter(Boolean).map(JSON.parse);
  } catch (e) {
    if (e.code === 'ENOENT') return [];
    throw e;
  }
}

// Records one turn in the user's conversation file; returns the reply.
function takeTurn(user, message) {
  const reply = 'echo: ' + message;
  fs.appendFileSync(historyPath(user),
    JSON.stringify({ ts: Date.now(), userId: user, message, reply }) + '\n');
  return reply;
}

function agentMessage(id, user, payload, stream) {
  const message = typeof payload === 'string' ? payload : payload && payload.message;
  if (typeof message !== 'string' || message === '') {
    return fail(id, 'INVALID_PAYLOAD', 'expected {"message": "..."} or a string');
  }
  const reply = takeTurn(user, message);
  if (stream) streamReply(id, id, reply);
  ok(id, { workerId: WORKER_ID, pid: process.pid, userId: user, turn: turns(user).length, reply, agent: 'node' });
}

// An OpenClaw gateway request: `method` with its `params`.
function rpc(id, user, method, params, stream) {
  if (method === 'health') return ok(id, { ok: true, workerId: WORKER_ID, pid: process.pid, agent: 'node' });
  if (method !== 'agent') return fail(id, 'INVALID_REQUEST', 'this agent serves health and agent, not ' + method);
  const { message, idempotencyKey: runId } = params || {};
  if (typeof message !== 'string' || message === '') {
    return fail(id, 'INVALID_REQUEST', 'invalid agent params: message is required');
  }
  if (typeof runId !== 'string' || runId === '') {
    return fail(id, 'INVALID_REQUEST', 'invalid agent params: idempotencyKey is required');
  }
  if (stream) {
    send({ type: 'accepted', requestId: id, payload: { runId, status: 'accepted', acceptedAt: Date.now() } });
  }
  const reply = takeTurn(user, message);
  if (stream) streamReply(id, runId, reply);
  ok(id, { runId, status: 'ok', summary: 'completed', result: { payloads: [{ text: reply }] } });
}

function agentCommand(id, user, payload) {
  const command = payload && payload.command;
  if (command === 'history') return ok(id, { turns: turns(user).slice(-100) });
  if (command === 'reset') {
    fs.rmSync(historyPath(user), { force: true });
    return ok(id, { reset: true });
  }
  if (command === 'stats') return ok(id, { turns: turns(user).length });
  return fail(id, 'UNKNOWN_COMMAND', 'commands: history, reset, stats');
}

const rl = readline.createInterface({ input: process.stdin });
rl.on('line', (line) => {
  const msg = JSON.parse(line);
  if (msg.type === 'health:check') return send({ type: 'heartbeat' });
  if (msg.type === 'shutdown') { rl.close(); return; }
  if (msg.type !== 'request') return;
  const { requestId, userId, type, payload, stream, method } = msg.request;
  try {
    if (type === 'agent:message') agentMessage(requestId, userId, payload, stream);
    else if (type === 'rpc') rpc(requestId, userId, method, payload, stream);
    else if (type === 'agent:command') agentCommand(requestId, userId, payload);
    else if (type === 'echo') ok(requestId, payload);
    else if (type === 'health:check') ok(requestId, { status: 'ok', workerId: WORKER_ID, pid: process.pid });
    else fail(requestId, 'UNSUPPORTED', 'this agent does not handle ' + type);
  } catch (e) {
    fail(requestId, 'STORAGE_ERROR', String(e && e.message), 500);
  }
});
rl.on('close', () => process.exit(0));
send({ type: 'ready' });
