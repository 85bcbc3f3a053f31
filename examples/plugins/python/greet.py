#!/usr/bin/env python3
"""A complete fleetcmd gateway plugin: JSON-RPC 2.0, one object per line."""
import json
import os
import sys

next_id = 1


def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def ask_gateway(method, params):
    """A request to the gateway while answering a command; returns its result."""
    global next_id
    my_id = "p%d" % next_id
    next_id += 1
    send({"jsonrpc": "2.0", "id": my_id, "method": method, "params": params})
    reply = json.loads(sys.stdin.readline())
    if "error" in reply:
        raise RuntimeError(reply["error"]["message"])
    return reply["result"]


def command(params, call):
    caller = params["caller"]
    if params["command"] == "greet":
        name = params["args"][0] if params["args"] else caller["person"]
        has_token = "yes" if os.environ.get("GREET_TOKEN") else "no"
        return {"lines": ["hello %s from %s in %s" % (name, caller["platform"], caller["channel"]),
                          "token configured: %s" % has_token]}
    if params["command"] == "loadcheck":
        # Runs as the caller: the policy, approvals and audit apply as if
        # they had typed `run uptime on SELECTOR`; the channel sees the job.
        out = ask_gateway("job.run", {"call": call, "command": "uptime", "args": [],
                                      "selector": params["args"][0]})
        if out["outcome"] == "submitted":
            return {"lines": ["job %s submitted as you; its result is posted here" % out["job_id"]]}
        if out["outcome"] == "dry_run":
            return {"lines": ["dry run: nothing submitted"]}
        return {"lines": ["job not run: %s" % out["reason"]]}
    raise ValueError("unknown command")


for line in sys.stdin:
    msg = json.loads(line)
    if msg["method"] == "initialize":
        result = {"protocol_version": 1, "commands": ["greet", "loadcheck"]}
    else:
        try:
            result = command(msg["params"], msg["id"])
        except Exception as e:  # answered as a JSON-RPC error, the plugin lives on
            send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": 2, "message": str(e)}})
            continue
    send({"jsonrpc": "2.0", "id": msg["id"], "result": result})
