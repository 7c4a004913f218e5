#!/usr/bin/env python3
"""A moltbot agent in Python (standard library only), for `worker_command`.

Run a gateway with it:
    moltbot gateway --worker-command "/usr/bin/python3 examples/agents/agent.py"

Each worker process starts one copy inside its sandbox (cwd = sandbox, MOLTBOT_* variables
set) and talks to it over stdin/stdout in JSON Lines. This agent keeps a conversation file per
user in $MOLTBOT_SESSIONS_DIR and named session state in $MOLTBOT_STATE_DIR.
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


def fail(rid, code, message):
    send({"type": "response", "response": {
        "requestId": rid, "success": False, "error": message, "errorCode": code}})


def history_path(user):
    return os.path.join(SESSIONS, safe(user) + ".jsonl")


def turns(user):
    try:
        with open(history_path(user), encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def agent_message(rid, user, payload):
    if isinstance(payload, dict):
        message = payload.get("message")
    else:
        message = payload
    if not isinstance(message, str) or not message:
        return fail(rid, "INVALID_PAYLOAD", "expected {\"message\": \"...\"} or a string")
    reply = "echo: " + message
    with open(history_path(user), "a", encoding="utf-8") as f:
        f.write(json.dumps({"ts": int(time.time() * 1000), "userId": user,
                            "message": message, "reply": reply}) + "\n")
    ok(rid, {"workerId": WORKER_ID, "pid": os.getpid(), "userId": user,
             "turn": len(turns(user)), "reply": reply, "agent": "python"})


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
            fail(rid, "NOT_FOUND", "no session " + name)
    elif action == "delete":
        try:
            os.remove(path)
            ok(rid, {"name": name, "deleted": True})
        except FileNotFoundError:
            fail(rid, "NOT_FOUND", "no session " + name)
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
            try:
                if rtype == "agent:message":
                    agent_message(rid, user, payload)
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
                fail(rid, "STORAGE_ERROR", str(e))


if __name__ == "__main__":
    main()
