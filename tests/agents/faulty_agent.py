#!/usr/bin/env python3
"""A misbehaving agent for tests/stdio.rs: the message of an echo request selects a fault.

  {"fault": "exit"}        exit(3) without answering
  {"fault": "garbage"}     write a line that is not JSON
  {"fault": "huge"}        write one line of 8 MiB
  {"fault": "unknown-id"}  answer a request id it was never given
  {"fault": "event-unknown-id"}  send an event for a request id it was never given
  {"fault": "bad-event-name"}    send an event whose name has a space
  {"fault": "parts"}       send an accepted line and an event for the request, then answer
  {"fault": "silent"}      stop answering health checks (and everything else), stay alive
  {"fault": "slow", "ms"}  answer after sleeping
  {"fault": "status", "status", "body"}  answer success with this status and this string as payload
anything else is echoed. With MOLTBOT_FAULTY_IGNORE_SHUTDOWN=1 it ignores `shutdown` messages.
"""

import json
import os
import sys
import time

IGNORE_SHUTDOWN = os.environ.get("MOLTBOT_FAULTY_IGNORE_SHUTDOWN") == "1"
sys.stderr.write("faulty agent started\n")
sys.stderr.flush()
silent = False


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


send({"type": "ready"})
for line in sys.stdin:
    msg = json.loads(line)
    if silent:
        continue
    kind = msg.get("type")
    if kind == "health:check":
        send({"type": "heartbeat"})
        continue
    if kind == "shutdown":
        if IGNORE_SHUTDOWN:
            continue
        break
    if kind != "request":
        continue
    req = msg["request"]
    payload = req.get("payload")
    fault = payload.get("fault") if isinstance(payload, dict) else None
    if fault == "exit":
        sys.exit(3)
    elif fault == "garbage":
        sys.stdout.write("this is not json\n")
        sys.stdout.flush()
    elif fault == "huge":
        sys.stdout.write("x" * (8 << 20) + "\n")
        sys.stdout.flush()
    elif fault == "unknown-id":
        send({"type": "response", "response": {"requestId": "9-999999", "success": True, "payload": {}}})
    elif fault == "event-unknown-id":
        send({"type": "event", "requestId": "9-999999", "event": "agent", "payload": {}})
    elif fault == "bad-event-name":
        send({"type": "event", "requestId": req["requestId"], "event": "a b", "payload": {}})
    elif fault == "silent":
        silent = True
    elif fault == "status":
        send({"type": "response", "response": {"requestId": req["requestId"], "success": True,
                                               "status": payload["status"], "payload": payload["body"]}})
    else:
        if fault == "slow":
            time.sleep(payload.get("ms", 100) / 1000)
        if fault == "parts":
            send({"type": "accepted", "requestId": req["requestId"], "payload": {"runId": "r"}})
            send({"type": "event", "requestId": req["requestId"], "event": "agent",
                  "payload": {"runId": "r", "seq": 1}})
        send({"type": "response", "response": {"requestId": req["requestId"], "success": True, "payload": payload}})
# Stay up a little after `shutdown` only if asked to ignore it (handled above).
