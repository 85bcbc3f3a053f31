#!/usr/bin/env python3
"""Script fleetcmd over its gRPC API: list agents, run a signed job, search
the audit trail. What it does step by step is docs/api.md.

Needs: pip install grpcio grpcio-tools cryptography (Python 3.11+, for
tomllib). The client stubs are generated from the .proto at start.

    export FLEETCMD_CONTROLLER=https://ctl.example.com:7443 \\
           FLEETCMD_CA=alice/ca.crt FLEETCMD_CERT=alice/alice.crt \\
           FLEETCMD_KEY=alice/alice.key FLEETCMD_SIGNING_KEY=alice/alice.sign.key
    python3 fleet.py agents [--on SELECTOR]
    python3 fleet.py run echo text=hello --on role=web
    python3 fleet.py audit --job JOB_ID
"""

import argparse
import base64
import importlib
import json
import os
import re
import secrets
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The .proto of a checkout: examples/python/ -> proto/proto/.
DEFAULT_PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto" / "proto"
PROTO_FILE = "fleetcmd/v1/fleetcmd.proto"
# States after which a job changes no more.
FINISHED = {"succeeded", "failed", "aborted", "canceled", "expired", "denied"}
# How long a signed job may wait to start (expires_at - not_before); the
# policy's max_job_lifetime bounds it.
JOB_LIFETIME_SECS = 600


class Usage(Exception):
    """Bad input: the message names what was wrong."""


def generate_stubs(proto_root: Path):
    """Generates the Python modules from the .proto into a temporary
    directory and imports them (grpcio-tools carries protoc)."""
    from grpc_tools import protoc

    if not (proto_root / PROTO_FILE).is_file():
        raise Usage(f"--proto {proto_root}: no {PROTO_FILE} in it")
    out = tempfile.mkdtemp(prefix="fleetcmd-stubs-")
    include = Path(protoc.__file__).parent / "_proto"
    rc = protoc.main(
        [
            "protoc",
            f"-I{proto_root}",
            f"-I{include}",
            f"--python_out={out}",
            f"--grpc_python_out={out}",
            PROTO_FILE,
        ]
    )
    if rc != 0:
        raise Usage(f"protoc failed on {proto_root / PROTO_FILE}")
    sys.path.insert(0, out)
    pb = importlib.import_module("fleetcmd.v1.fleetcmd_pb2")
    rpc = importlib.import_module("fleetcmd.v1.fleetcmd_pb2_grpc")
    return pb, rpc


def read(path, what):
    if not path:
        raise Usage(f"{what} is required")
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise Usage(f"{what} {path}: {e.strerror}") from None


def target_of(url: str) -> str:
    """`https://host:port` (as FLEETCMD_CONTROLLER) -> `host:port`."""
    rest = url.removeprefix("https://")
    if "://" in rest or not rest or "/" in rest.rstrip("/"):
        raise Usage(f"--controller {url!r}: expected https://HOST:PORT")
    rest = rest.rstrip("/")
    return rest if ":" in rest.rsplit("]", 1)[-1] else rest + ":7443"


def operator_name(cert_pem: bytes, path) -> str:
    """The operator's name from its certificate: the SAN URI
    `urn:fleetcmd:operator:NAME`. Jobs are requested as `cli:NAME`."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        raise Usage(f"--cert {path}: not a fleetcmd certificate") from None
    for uri in san.value.get_values_for_type(x509.UniformResourceIdentifier):
        if uri.startswith("urn:fleetcmd:operator:"):
            return uri.removeprefix("urn:fleetcmd:operator:")
    raise Usage(f"--cert {path}: not an operator certificate")


def policy_public_key(key: Ed25519PrivateKey) -> str:
    """A public key as the policy writes it: `ed25519:` + base64 of its
    SubjectPublicKeyInfo DER."""
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "ed25519:" + base64.b64encode(spki).decode()


def glob_match(pattern: str, text: str) -> bool:
    """A policy identity pattern: `*` matches any run of characters,
    everything else is literal, the whole text must match."""
    regex = ".*".join(re.escape(part) for part in pattern.split("*"))
    return re.fullmatch(regex, text, re.DOTALL) is not None


def uuid7() -> str:
    """A version 7 UUID (48 bits of Unix milliseconds, then random), in the
    lowercase 8-4-4-4-12 form the controller requires for a job id."""
    ms = time.time_ns() // 1_000_000
    b = bytearray(ms.to_bytes(6, "big") + secrets.token_bytes(10))
    b[6] = 0x70 | (b[6] & 0x0F)
    b[8] = 0x80 | (b[8] & 0x3F)
    h = b.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class Fleet:
    def __init__(self, args, pb, rpc):
        self.pb, self.rpc = pb, rpc
        self.args = args
        ca = read(args.ca, "--ca (FLEETCMD_CA)")
        self.cert_pem = read(args.cert, "--cert (FLEETCMD_CERT)")
        key = read(args.key, "--key (FLEETCMD_KEY)")
        # mTLS: the fleet CA verifies the controller, the operator
        # certificate (ECDSA P-256) authenticates us.
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca, private_key=key, certificate_chain=self.cert_pem
        )
        self.channel = grpc.secure_channel(target_of(args.controller), creds)

    def agents(self, selector=""):
        stub = self.rpc.AgentsStub(self.channel)
        return stub.List(self.pb.ListAgentsRequest(selector=selector), timeout=30).agents

    def signing_key(self) -> Ed25519PrivateKey:
        path = self.args.signing_key
        if not path and self.args.key:
            # issue-cert writes NAME.sign.key beside NAME.key.
            path = str(Path(self.args.key).with_suffix(".sign.key"))
        pem = read(path, "--signing-key (FLEETCMD_SIGNING_KEY)")
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise Usage(f"--signing-key {path}: not an Ed25519 key")
        return key

    def signer_id(self, key: Ed25519PrivateKey, requester: str, command: str) -> str:
        """The id of the policy's `[[signers]]` entry for our key that may
        sign `command` (`may_sign`) for `requester` (`vouches_for`). One
        key may have several entries. The policy comes from the controller;
        only the agents' verification of it matters."""
        info = self.rpc.PolicyStub(self.channel).Get(self.pb.GetPolicyRequest(), timeout=30)
        policy = tomllib.loads(info.policy.bundle.decode())
        mine = policy_public_key(key)
        for signer in policy.get("signers", []):
            if (
                signer.get("public_key") == mine
                and any(c in ("*", command) for c in signer.get("may_sign", []))
                and any(glob_match(p, requester) for p in signer.get("vouches_for", []))
            ):
                return signer["id"]
        raise Usage(
            f"your signing key ({mine}) has no [[signers]] entry in the policy"
            f" that may sign `{command}` for {requester}"
        )

    def submit(self, command, values, selector, timeout_secs=0):
        key = self.signing_key()
        requester = "cli:" + operator_name(self.cert_pem, self.args.cert)
        now = int(time.time())
        # The job spec: a JSON object with exactly these fields (unknown
        # ones are refused). The signature covers these exact bytes, which
        # travel with it: no canonical form is needed.
        spec = {
            "id": uuid7(),
            "command": command,
            "args": values,
            "selector": selector,
            "requester": requester,
            "channel": "cli",
            "timeout_secs": timeout_secs,
            "not_before": now,
            "expires_at": now + JOB_LIFETIME_SECS,
        }
        spec_bytes = json.dumps(spec, separators=(",", ":")).encode()
        job = self.pb.SignedJob(
            spec=spec_bytes,
            signature=key.sign(spec_bytes),
            key_id=self.signer_id(key, requester, command),
        )
        return self.rpc.JobsStub(self.channel).Submit(job, timeout=30)

    def watch(self, job_id):
        """Follows the job until it ends; returns the finished Job."""
        stub = self.rpc.JobsStub(self.channel)
        for event in stub.Watch(self.pb.WatchJobRequest(job_id=job_id)):
            kind = event.WhichOneof("event")
            if kind == "job" and event.job.state in FINISHED:
                return event.job
            if kind == "missed":
                # Fell behind: the stored job has everything.
                break
        return stub.Get(self.pb.GetJobRequest(job_id=job_id), timeout=30)

    def audit(self, job_id, limit):
        stub = self.rpc.AuditStub(self.channel)
        req = self.pb.AuditSearchRequest(job_id=job_id, limit=limit)
        return [json.loads(r) for r in stub.Search(req, timeout=30).records]


def print_agents(agents):
    print(f"{'AGENT':<24} {'STATE':<8} LABELS")
    for a in agents:
        state = "revoked" if a.revoked else "online" if a.online else "offline"
        labels = ",".join(f"{k}={v}" for k, v in sorted(a.labels.items())) or "-"
        print(f"{a.agent_id:<24} {state:<8} {labels}")


def print_job(job):
    print(f"job {job.job_id}: {job.state}")
    for t in job.targets:
        r = t.result
        code = f" exit {r.exit_code}" if r.HasField("exit_code") else ""
        why = f" ({r.reason})" if r.reason else ""
        print(f"{t.agent_id}: {t.state}{code}{why}")
        for line in r.stdout.decode(errors="replace").splitlines():
            print(f"{t.agent_id}: {line}")


def main(argv=None):
    env = os.environ.get
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--controller", default=env("FLEETCMD_CONTROLLER", "https://127.0.0.1:7443"))
    p.add_argument("--ca", default=env("FLEETCMD_CA"))
    p.add_argument("--cert", default=env("FLEETCMD_CERT"))
    p.add_argument("--key", default=env("FLEETCMD_KEY"))
    p.add_argument("--signing-key", default=env("FLEETCMD_SIGNING_KEY"))
    p.add_argument("--proto", type=Path, default=DEFAULT_PROTO_ROOT,
                   help="directory holding fleetcmd/v1/fleetcmd.proto")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("agents", help="list agents")
    a.add_argument("--on", default="", help="label selector, e.g. role=web")
    r = sub.add_parser("run", help="sign and submit a job, print its result")
    r.add_argument("command")
    r.add_argument("values", nargs="*", metavar="NAME=VALUE",
                   help="argument values by the names of the policy's args.NAME")
    r.add_argument("--on", default="all", help="label selector [default: all]")
    r.add_argument("--timeout", type=int, default=0, metavar="SECS",
                   help="0 = the command's own timeout")
    s = sub.add_parser("audit", help="search the audit trail")
    s.add_argument("--job", default="")
    s.add_argument("--limit", type=int, default=20)
    args = p.parse_args(argv)
    try:
        pb, rpc = generate_stubs(args.proto)
        fleet = Fleet(args, pb, rpc)
        if args.cmd == "agents":
            print_agents(fleet.agents(args.on))
            return 0
        if args.cmd == "audit":
            for rec in fleet.audit(args.job, args.limit):
                print(json.dumps(rec, sort_keys=True))
            return 0
        values = {}
        for v in args.values:
            name, eq, value = v.partition("=")
            if not eq or not name:
                raise Usage(f"argument {v!r}: expected NAME=VALUE")
            values[name] = value
        sub = fleet.submit(args.command, values, args.on, args.timeout)
        print(f"job {sub.job_id} on {len(sub.targets)} agent(s)", file=sys.stderr)
        job = fleet.watch(sub.job_id)
        print_job(job)
        return 0 if job.state == "succeeded" else 1
    except Usage as e:
        print(f"fleet.py: {e}", file=sys.stderr)
        return 64
    except grpc.RpcError as e:
        print(f"fleet.py: controller: {e.code().name}: {e.details()}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
