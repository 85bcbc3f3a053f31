"""A human Matrix user for chat-gateway/tests/it/matrix.rs, on matrix-nio.

Reads one JSON request per line on stdin, answers one JSON line on stdout:
  {"op": "register", "user": U, "password": P}      shared-secret registration
  {"op": "login", "user": U, "password": P}         then syncs in the background
  {"op": "create_room", "alias": A, "encrypted": B, "invite": [ids]}
  {"op": "join", "room": R}
  {"op": "say", "room": R, "text": T}               an m.text message
  {"op": "react", "room": R, "event_id": E, "key": K}
  {"op": "wait", "room": R, "sender": S, "contains": T, "timeout": secs}
      the first event from S in R (seen since login) whose body, or the
      body of its m.new_content, contains T
  {"op": "events", "room": R, "sender": S}          every event seen so far
Answers {"ok": ...} or {"error": "..."}.
"""

import asyncio
import hashlib
import hmac
import json
import sys
import urllib.request

from nio import AsyncClient, LoginResponse, RoomCreateResponse, RoomSendResponse

HS = sys.argv[1]
SHARED_SECRET = sys.argv[2]


def register(user, password):
    url = HS + "/_synapse/admin/v1/register"
    nonce = json.load(urllib.request.urlopen(url))["nonce"]
    mac = hmac.new(SHARED_SECRET.encode(), digestmod=hashlib.sha1)
    mac.update(b"\x00".join([nonce.encode(), user.encode(), password.encode(), b"notadmin"]))
    body = json.dumps(
        {"nonce": nonce, "username": user, "password": password, "admin": False, "mac": mac.hexdigest()}
    ).encode()
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))["user_id"]


class User:
    def __init__(self):
        self.client = None
        self.seen = []  # (room_id, event source dict)
        self.task = None

    async def on_event(self, room, event):
        self.seen.append((room.room_id, event.source))

    async def login(self, user, password):
        self.client = AsyncClient(HS, user)
        resp = await self.client.login(password)
        if not isinstance(resp, LoginResponse):
            raise RuntimeError(f"login: {resp}")
        # Start from now: the first sync's history is not "seen".
        await self.client.sync(timeout=0, full_state=True)
        self.client.add_event_callback(self.on_event, object)
        self.task = asyncio.ensure_future(self.sync_loop())
        return resp.user_id

    async def sync_loop(self):
        # nio's loop ends on any exception; a test waiting for a message
        # would then time out without saying why.
        while True:
            try:
                await self.client.sync_forever(timeout=1000)
            except asyncio.CancelledError:
                raise
            except Exception as e:
                print(f"user.py: sync failed: {e!r}", file=sys.stderr, flush=True)
                await asyncio.sleep(0.1)

    async def create_room(self, alias, encrypted, invite):
        state = []
        if encrypted:
            state.append(
                {"type": "m.room.encryption", "state_key": "", "content": {"algorithm": "m.megolm.v1.aes-sha2"}}
            )
        resp = await self.client.room_create(alias=alias, invite=invite, initial_state=state)
        if not isinstance(resp, RoomCreateResponse):
            raise RuntimeError(f"room_create: {resp}")
        return resp.room_id

    async def send(self, room, event_type, content):
        # Raw send: nio without libolm would otherwise refuse encrypted rooms.
        resp = await self.client.room_send(room, event_type, content, ignore_unverified_devices=True)
        if not isinstance(resp, RoomSendResponse):
            raise RuntimeError(f"room_send: {resp}")
        return resp.event_id

    def matching(self, room, sender):
        return [src for (r, src) in self.seen if r == room and src.get("sender") == sender]

    async def wait(self, room, sender, contains, timeout):
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while loop.time() < end:
            for src in self.matching(room, sender):
                content = src.get("content", {})
                bodies = [content.get("body", ""), content.get("m.new_content", {}).get("body", "")]
                if any(contains in b for b in bodies):
                    return src
            await asyncio.sleep(0.05)
        raise RuntimeError(f"no event from {sender} in {room} containing {contains!r} within {timeout}s")


async def main():
    user = User()
    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    while True:
        line = await reader.readline()
        if not line:
            break
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "register":
                ok = register(req["user"], req["password"])
            elif op == "login":
                ok = await user.login(req["user"], req["password"])
            elif op == "create_room":
                ok = await user.create_room(req["alias"], req["encrypted"], req["invite"])
            elif op == "join":
                resp = await user.client.join(req["room"])
                if not hasattr(resp, "room_id"):
                    raise RuntimeError(f"join: {resp}")
                ok = resp.room_id
            elif op == "say":
                ok = await user.send(req["room"], "m.room.message", {"msgtype": "m.text", "body": req["text"]})
            elif op == "react":
                ok = await user.send(
                    req["room"],
                    "m.reaction",
                    {"m.relates_to": {"rel_type": "m.annotation", "event_id": req["event_id"], "key": req["key"]}},
                )
            elif op == "wait":
                ok = await user.wait(req["room"], req["sender"], req["contains"], req["timeout"])
            elif op == "events":
                ok = user.matching(req["room"], req["sender"])
            else:
                raise RuntimeError(f"unknown op {op}")
            out = {"ok": ok}
        except Exception as e:  # reported to the test, which fails with it
            out = {"error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()
    if user.client:
        if user.task:
            user.task.cancel()
        await user.client.close()


asyncio.run(main())
