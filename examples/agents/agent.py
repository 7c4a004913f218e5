#!/usr/bin/env python3
"""A moltbot agent in Python (standard library only), for `worker_command`.

Run a gateway with it:
    moltbot gateway --worker-command "/usr/bin/python3 examples/agents/agent.py"

Each worker process starts one copy inside its sandbox (cwd = sandbox, MOLTBOT_* variables
set) and talks to it over stdin/stdout in JSON Lines. This agent keeps a conversation file per
user in $MOLTBOT_SESSIONS_DIR and named session state in $MOLTBOT_STATE_DIR. A request sent
with "stream": true gets its reply word by word as `agent` events first; OpenClaw RPC requests
(type "rpc") are answered for `health` and `agent`.
"""

import base64
import json
import os
import re
import sys
import time

WORKER_ID = os.environ.get("MOLTBOT_WORKER_ID", "worker-?")
SESSIONS = os.environ.get("MOLTBOT_SESSIONS_DIR", "sessions")
STATE = os.environ.get("MOLTBOT_STATE_DIR", "state")
PLAIN = re.compile(r"^[A-Za-z0-9_-]+$")
NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$")


def safe(user):
    """The gateway's file-name encoding of a user id: as is if plain, else ~base64url."""
    if PLAIN.match(user):
        return user
    return "~" + base64.urlsafe_b64encode(user.encode()).decode().rstrip("=")


def send(obj):
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def ok(rid, payload):
    send({"type": "response", "response": {"requestId": rid, "success": True, "payload": payload}})


def fail(rid, code, message, status=400):
    send({"type": "response", "response": {
        "requestId": rid, "success": False, "error": message, "errorCode": code,
        "status": status}})


def now_ms():
    return int(time.time() * 1000)


def stream_reply(rid, run_id, reply):
    """Sends `reply` word by word as OpenClaw `agent` events, between lifecycle start and end."""
    seq = 0

    def agent_event(stream, data):
        nonlocal seq
        seq += 1
        send({"type": "event", "requestId": rid, "event": "agent", "payload": {
            "runId": run_id, "seq": seq, "stream": stream, "ts": now_ms(), "data": data}})

    started = now_ms()
    agent_event("lifecycle", {"phase": "start", "startedAt": started})
    text = ""
    for piece in re.split(r"(?<=\S)(?=\s)", reply):
        text += piece
        agent_event("assistant", {"text": text, "delta": piece})
    agent_event("lifecycle", {"phase": "end", "startedAt": started, "endedAt": now_ms()})


def history_path(user):
    return os.path.join(SESSIONS, safe(user) + ".jsonl")


def turns(user):
    try:
        with open(history_path(user), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def take_turn(user, message):
    """Records one turn in the user's conversation file; returns the reply."""
    reply = "echo: " + message
    with open(history_path(user), "a", encoding="utf-8") as f:
        f.write(json.dumps({"ts": now_ms(), "userId": user,
                            "message": message, "reply": reply}) + "\n")
    return reply


def agent_message(rid, user, payload, stream):
    if isinstance(payload, dict):
        message = payload.get("message")
    else:
        message = payload
    if not isinstance(message, str) or not message:
        return fail(rid, "INVALID_PAYLOAD", "expected {\"message\": \"...\"} or a string")
    reply = take_turn(user, message)
    if stream:
        stream_reply(rid, rid, reply)
    ok(rid, {"workerId": WORKER_ID, "pid": os.getpid(), "userId": user,
             "turn": len(turns(user)), "reply": reply, "agent": "python"})


def rpc(rid, user, method, params, stream):
    """An OpenClaw gateway request: `method` with its `params`."""
    if method == "health":
        return ok(rid, {"ok": True, "workerId": WORKER_ID, "pid": os.getpid(), "agent": "python"})
    if method != "agent":
        return fail(rid, "INVALID_REQUEST", "this agent serves health and agent, not " + method)
    params = params if isinstance(params, dict) else {}
    message, run_id = params.get("message"), params.get("idempotencyKey")
    if not isinstance(message, str) or not message:
        return fail(rid, "INVALID_REQUEST", "invalid agent params: message is required")
    if not isinstance(run_id, str) or not run_id:
        return fail(rid, "INVALID_REQUEST", "invalid agent params: idempotencyKey is required")
    if stream:
        send({"type": "accepted", "requestId": rid, "payload": {
            "runId": run_id, "status": "accepted", "acceptedAt": now_ms()}})
    reply = take_turn(user, message)
    if stream:
        stream_reply(rid, run_id, reply)
    ok(rid, {"runId": run_id, "status": "ok", "summary": "completed",
             "result": {"payloads": [{"text": reply}]}})


def agent_command(rid, user, payload):
    command = payload.get("command") if isinstance(payload, dict) else None
    if command == "history":
        ok(rid, {"turns": turns(user)[-100:]})
    elif command == "reset":
        try:
            os.remove(history_path(user))
        except FileNotFoundError:
            pass
        ok(rid, {"reset": True})
    elif command == "stats":
        ok(rid, {"turns": len(turns(user))})
    else:
        fail(rid, "UNKNOWN_COMMAND", "commands: history, reset, stats")


def session(rid, user, payload):
    if not isinstance(payload, dict):
        return fail(rid, "INVALID_PAYLOAD", "expected {\"action\", \"name\", \"value\"}")
    action, name = payload.get("action"), payload.get("name") or ""
    folder = os.path.join(STATE, safe(user))
    if action == "list":
        try:
            names = sorted(n[:-5] for n in os.listdir(folder) if n.endswith(".json"))
        except FileNotFoundError:
            names = []
        return ok(rid, {"names": names})
    if not NAME.match(name):
        return fail(rid, "INVALID_NAME", "session names are [A-Za-z0-9_.-], 1-64 bytes")
    path = os.path.join(folder, name + ".json")
    if action == "set":
        os.makedirs(folder, exist_ok=True)
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            json.dump(payload.get("value"), f)
        os.replace(path + ".tmp", path)
        ok(rid, {"name": name, "stored": True})
    elif action == "get":
        try:
            with open(path, encoding="utf-8") as f:
                ok(rid, {"name": name, "value": json.load(f)})
        except FileNotFoundError:
            fail(rid, "NOT_FOUND", "no session " + name, 404)
    elif action == "delete":
        try:
            os.remove(path)
            ok(rid, {"name": name, "deleted": True})
        except FileNotFoundError:
            fail(rid, "NOT_FOUND", "no session " + name, 404)
    else:
        fail(rid, "UNKNOWN_ACTION", "actions: get, set, delete, list")


def main():
    send({"type": "ready"})
    for line in sys.stdin:
        msg = json.loads(line)
        kind = msg.get("type")
        if kind == "health:check":
            send({"type": "heartbeat"})
        elif kind == "shutdown":
            return
        elif kind == "request":
            req = msg["request"]
            rid, user, rtype, payload = req["requestId"], req["userId"], req["type"], req.get("payload")
            stream = req.get("stream", False)
            try:
                if rtype == "agent:message":
                    agent_message(rid, user, payload, stream)
                elif rtype == "rpc":
                    rpc(rid, user, req.get("method"), payload, stream)
                elif rtype == "agent:command":
                    agent_command(rid, user, payload)
                elif rtype == "session":
                    session(rid, user, payload)
                elif rtype == "echo":
                    ok(rid, payload)
                elif rtype == "health:check":
                    ok(rid, {"status": "ok", "workerId": WORKER_ID, "pid": os.getpid()})
                else:
                    fail(rid, "UNSUPPORTED", "this agent does not handle " + rtype)
            except OSError as e:
                fail(rid, "STORAGE_ERROR", str(e), 500)


if __name__ == "__main__":
    main()
