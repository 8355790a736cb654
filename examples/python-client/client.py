#!/usr/bin/env python3
"""Calls the lab's service B from Python, the way a grpcurl-style tool sees it.

1. Discovery: reads every B registered under the prefix through etcd's JSON
   gateway (POST /v3/kv/range; keys and values are base64), and decodes each
   value, {"Op":0,"Addr":"host:port"}, as etcd's Go naming package does.
2. Health and reflection: asks each B for grpc.health.v1 status of
   lab.v1.Backend and, through server reflection, for its services and the
   methods of lab.v1.Backend.
3. Calls: GetItem with the stubs generate.sh builds from proto/, spread round
   robin over one channel per B, counting each reply's served_by.

It prints two JSON lines: the instances (address, health, services, methods)
and a tally of the calls (served_by counts, failures by status code). It
exits 1 if etcd cannot be read, no B is registered, a B does not answer
health or reflection, or no call succeeded; 2 on a bad argument.
"""

import argparse
import base64
import json
import os
import sys
import urllib.request

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

BACKEND_SERVICE = "lab.v1.Backend"
DEFAULT_STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gen")


def import_stubs(directory: str):
    """The lab.v1 modules generate.sh wrote into `directory`."""
    sys.path.insert(0, directory)
    try:
        from lab.v1 import backend_pb2, backend_pb2_grpc
    except ImportError as err:
        sys.exit(f"client.py: no lab.v1 stubs in {directory} ({err}): run ./generate.sh first")
    return backend_pb2, backend_pb2_grpc


def prefix_end(prefix: bytes) -> bytes:
    """The first key after every key that starts with `prefix` (etcd's range_end)."""
    return prefix[:-1] + bytes([prefix[-1] + 1])


def registered(etcd: str, prefix: str, timeout: float) -> dict:
    """Instance id -> address of every B under `prefix`, from etcd's JSON gateway."""
    key = prefix.encode()
    body = json.dumps(
        {
            "key": base64.b64encode(key).decode(),
            "range_end": base64.b64encode(prefix_end(key)).decode(),
        }
    ).encode()
    request = urllib.request.Request(
        etcd.rstrip("/") + "/v3/kv/range",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        answer = json.load(response)
    instances = {}
    for kv in answer.get("kvs", []):
        key = base64.b64decode(kv["key"]).decode(errors="replace")
        try:
            addr = json.loads(base64.b64decode(kv.get("value", "")))["Addr"]
        except (ValueError, KeyError, TypeError):
            addr = None
        if not isinstance(addr, str) or not addr:
            print(f"client.py: skipping {key!r}: not a naming entry with an Addr", file=sys.stderr)
            continue
        instances[key[len(prefix):]] = addr
    return instances


def describe(channel: grpc.Channel, timeout: float) -> dict:
    """What a grpcurl-style tool learns about one B: health, services, methods."""
    health = health_pb2_grpc.HealthStub(channel).Check(
        health_pb2.HealthCheckRequest(service=BACKEND_SERVICE), timeout=timeout
    )
    reflection = ProtoReflectionDescriptorDatabase(channel)
    services = sorted(reflection.get_services())
    backend = reflection.FindFileContainingSymbol(BACKEND_SERVICE)
    methods = [
        method.name
        for service in backend.service
        if f"{backend.package}.{service.name}" == BACKEND_SERVICE
        for method in service.method
    ]
    return {
        "health": health_pb2.HealthCheckResponse.ServingStatus.Name(health.status),
        "services": services,
        "methods": methods,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--etcd", default="http://127.0.0.1:2379", help="etcd client URL")
    parser.add_argument(
        "--prefix", default="lab/services/backend/", help="registry prefix (etcd.prefix)"
    )
    parser.add_argument("--calls", type=int, default=100, help="GetItem calls to make")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds per call")
    parser.add_argument("--id-max", type=int, default=100, help="item ids cycle through 1..N")
    parser.add_argument("--stubs", default=DEFAULT_STUBS, help="where generate.sh wrote the stubs")
    args = parser.parse_args()
    backend_pb2, backend_pb2_grpc = import_stubs(args.stubs)

    if args.calls < 0 or args.id_max < 1:
        parser.error("--calls must be 0 or more and --id-max at least 1")

    try:
        instances = registered(args.etcd, args.prefix, args.timeout)
    except (OSError, ValueError) as err:  # URLError is an OSError; bad JSON a ValueError
        print(f"client.py: cannot read the registry from etcd at {args.etcd}: {err}", file=sys.stderr)
        return 1
    if not instances:
        print(f"client.py: no B registered under {args.prefix!r} in {args.etcd}", file=sys.stderr)
        return 1
    channels = {b: grpc.insecure_channel(addr) for b, addr in sorted(instances.items())}
    report = {}
    for b, channel in channels.items():
        try:
            report[b] = {"addr": instances[b], **describe(channel, args.timeout)}
        except grpc.RpcError as err:
            print(f"client.py: {b} at {instances[b]} did not answer health or reflection: "
                  f"{err.code().name} {err.details()}", file=sys.stderr)
            return 1
        except KeyError as err:  # reflection answered, but without the symbol
            print(f"client.py: {b} at {instances[b]} does not reflect {err}", file=sys.stderr)
            return 1
    print(json.dumps({"instances": report}), flush=True)

    stubs = [backend_pb2_grpc.BackendStub(channel) for channel in channels.values()]
    tally = {"calls": 0, "served_by": {}, "errors": {}}
    for i in range(args.calls):
        stub = stubs[i % len(stubs)]
        tally["calls"] += 1
        try:
            reply = stub.GetItem(
                backend_pb2.GetItemRequest(id=i % args.id_max + 1), timeout=args.timeout
            )
        except grpc.RpcError as err:
            code = err.code().name
            tally["errors"][code] = tally["errors"].get(code, 0) + 1
            continue
        tally["served_by"][reply.served_by] = tally["served_by"].get(reply.served_by, 0) + 1
    print(json.dumps(tally), flush=True)
    for channel in channels.values():
        channel.close()
    return 0 if tally["served_by"] else 1


if __name__ == "__main__":
    sys.exit(main())
