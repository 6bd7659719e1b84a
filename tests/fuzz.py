#!/usr/bin/env python3
"""Hostile input against every method of a running local cluster (run by CI).

Starts `freshet up` on a temporary data dir and sends, to every method of every server
(PS nodes, gateway, worker), a mix of
  - random bytes (undecodable or decoding to nonsense),
  - semantic bad values built from each request's own descriptor (extreme integers,
    NaN and infinities, empty and 100 KB strings, unknown enum values, long lists),
  - mutations of those (bit flips, truncation, splices).
Then it checks what the issue asks of every answer and of the cluster:
  - every status is one of INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
    RESOURCE_EXHAUSTED, UNAVAILABLE, OUT_OF_RANGE, DEADLINE_EXCEEDED or OK (a generated
    input may be valid); never INTERNAL or UNKNOWN (an unexpected error or a panic);
  - an INVALID_ARGUMENT message names a field (`field: reason`) and is bounded in size;
  - nothing changed state while only rejections came back: data shards' checksums are
    compared around every window of calls that were all rejected;
  - every process is alive at the end and the gateway still answers health SERVING;
  - the largest RSS growth of any process over the run is printed.
Prints a table of inputs by method and status code. Exit status 1 on any violation.

Not fuzzed: the Raft peer transport (peers are trusted until transport security lands:
a crafted heartbeat makes raft-rs panic, which takes the node down on purpose) and the
membership calls (AddReplica, RemoveReplica, TransferLeader: a valid one is an operator's
decision, not bad input) which get only out-of-range node ids. Coordinator calls that
register, report or seal change the meta group legitimately, so windows that contain one
are not checked for state changes.

Usage: fuzz.py BIN_DIR [--inputs N] [--seed S]
Needs: grpcio-tools.
"""
import argparse
import collections
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import tempfile
import time

from local_up import wait_cluster

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "proto"

ALLOWED = {
    "OK",
    "INVALID_ARGUMENT",
    "NOT_FOUND",
    "FAILED_PRECONDITION",
    "RESOURCE_EXHAUSTED",
    "UNAVAILABLE",
    "OUT_OF_RANGE",
    "DEADLINE_EXCEEDED",
    "ALREADY_EXISTS",
    "UNIMPLEMENTED",
}
# The membership calls: a valid one is an operator's decision; only out-of-range ids.
MEMBERSHIP = {"AddReplica", "RemoveReplica", "TransferLeader"}
# Calls that legitimately change the meta group (and, through fences and seals later,
# the shards): sent only in the last tenth of the run, after the state-change checks.
META_WRITES = {"Register", "ReportFrontier", "RequestSeal", "SetModel"}
# Calls that change nothing even when they succeed.
READS = {
    "ClusterStatus", "LocalStatus", "ListSeals", "GetModel", "ListWorkers", "Lookup",
    "Status", "Pull", "PullDense", "ListTables", "GetImpressions", "Subscribe",
}
MESSAGE_BYTES_MAX = 1024 + 256
WINDOW = 20


def load_stubs(out):
    from grpc_tools import protoc

    out.mkdir(parents=True, exist_ok=True)
    files = [str(p) for p in sorted(PROTO.glob("*.proto"))]
    rc = protoc.main(["protoc", f"-I{PROTO}", f"--python_out={out}", *files])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, str(out))
    import importlib

    return [importlib.import_module(pathlib.Path(f).stem + "_pb2") for f in files]


INTS = [0, 1, 2, 3, 7, 255, 2**31 - 1, 2**32 - 1, 2**53, 2**63 - 1, 2**64 - 1]
SINTS = [0, 1, -1, -(2**31), 2**31 - 1, -(2**63), 2**63 - 1]
FLOATS = [0.0, -0.0, 1.0, -1.0, float("nan"), float("inf"), float("-inf"), 3e38, -3e38, 1e-45]
STRINGS = ["", "a", "item", "user", "x" * 100_000, "\u00e9\u4e2d\U0001f600", "../../etc/passwd", "a=b", "\x00"]


def rand_value(rng, field, depth, small=False):
    from google.protobuf.descriptor import FieldDescriptor as F

    t = field.type
    if t == F.TYPE_MESSAGE:
        return semantic(rng, field.message_type, depth + 1)
    if t == F.TYPE_ENUM:
        return rng.choice([v.number for v in field.enum_type.values] + [99, 2**31 - 1])
    if t in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return rng.choice(FLOATS + [rng.uniform(-1e6, 1e6)])
    if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
        return rng.choice([0, 1, -1, -(2**31), 2**31 - 1])
    if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
        return rng.choice(SINTS)
    if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
        return rng.choice([v for v in INTS if v < 2**32] + [rng.randrange(2**32)])
    if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
        return rng.choice(INTS + [rng.randrange(2**64)])
    if t == F.TYPE_BOOL:
        return rng.random() < 0.5
    if t == F.TYPE_STRING:
        if small:
            return rng.choice(["", "a", "item", "\u00e9"])
        return rng.choice(STRINGS + ["".join(rng.choice("abc=_-") for _ in range(rng.randrange(1, 20)))])
    if t == F.TYPE_BYTES:
        return os.urandom(rng.choice([0, 1, 8] if small else [0, 1, 8, 64, 4096]))
    raise ValueError(t)


def is_repeated(field):
    # protobuf 6+ has is_repeated; older releases only the label.
    if hasattr(field, "is_repeated"):
        return field.is_repeated
    return field.label == field.LABEL_REPEATED


def semantic(rng, desc, depth=0):
    """A message of type `desc` with each field set (or not) to an extreme value."""
    from google.protobuf import message_factory

    msg = message_factory.GetMessageClass(desc)()
    for field in desc.fields:
        if rng.random() < 0.3 or (depth > 2 and field.message_type is not None):
            continue
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            m = getattr(msg, field.name)
            kf, vf = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            n = rng.choice([0, 1, 3, 300])
            for _ in range(n):
                k = rand_value(rng, kf, depth, small=n > 3)
                if vf.message_type is not None:
                    m[k].CopyFrom(semantic(rng, vf.message_type, depth + 1))
                else:
                    m[k] = rand_value(rng, vf, depth, small=n > 3)
            continue
        if is_repeated(field):
            # Long lists of small values at the top level only (70,000 ids is the
            # poison-pill size of a step); nested lists stay short so a message stays
            # within a few MB.
            if field.message_type is not None:
                n = rng.choice([0, 1, 3])
            else:
                n = rng.choice([0, 1, 2, 5, 100, 70_000 if depth == 0 else 100])
            target = getattr(msg, field.name)
            for _ in range(n):
                v = rand_value(rng, field, depth, small=n > 5)
                if field.message_type is not None:
                    target.add().CopyFrom(v)
                else:
                    target.append(v)
            continue
        v = rand_value(rng, field, depth)
        if field.message_type is not None:
            getattr(msg, field.name).CopyFrom(v)
        else:
            setattr(msg, field.name, v)
    return msg


def mutate(rng, data):
    b = bytearray(data)
    for _ in range(rng.randrange(1, 6)):
        op = rng.randrange(4)
        if op == 0 and b:
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:
            del b[rng.randrange(len(b)):]
        elif op == 2:
            i = rng.randrange(len(b) + 1)
            b[i:i] = os.urandom(rng.randrange(1, 16))
        elif b:
            i, j = sorted(rng.randrange(len(b)) for _ in range(2))
            b[i:i] = b[i:j]
    return bytes(b)


def cmd(pid):
    try:
        argv = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return " ".join(a.decode() for a in argv[:2]).split("/")[-1]
    except OSError:
        return str(pid)


def rss_kib(pid):
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def cluster_pids(parent):
    """The processes `freshet up` started (the nodes, gateway and worker)."""
    pids = []
    for p in pathlib.Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        # The field after the parenthesised name is the state, then the parent pid.
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == parent:
            pids.append(int(p.name))
    return sorted(pids)


def settled(read, quiet_s=0.5, max_s=30):
    """Checksums once two reads `quiet_s` apart agree (at most `max_s`)."""
    deadline = time.time() + max_s
    last = read()
    while time.time() < deadline:
        time.sleep(quiet_s)
        now = read()
        if now == last:
            return now
        last = now
    return last


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("bin", nargs="?", default=str(ROOT / "target" / "debug"))
    ap.add_argument("--inputs", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    bin_dir = pathlib.Path(args.bin)
    rng = random.Random(args.seed)

    import grpc

    with tempfile.TemporaryDirectory() as tmp:
        mods = load_stubs(pathlib.Path(tmp) / "stubs")
        data = pathlib.Path(tmp) / "data"
        log = open(pathlib.Path(tmp) / "up.log", "w")
        up = subprocess.Popen(
            [str(bin_dir / "freshet"), "up", "--data-dir", str(data)],
            stdout=log,
            stderr=subprocess.STDOUT,
            # Idle seals off (the PS nodes read FRESHET_IDLE_SEAL_MS): the check below
            # compares every replica's checksum, sealed epoch included, across windows of
            # rejected calls, and a seal the coordinator's clock inserts would change it
            # with no input at all (and `settled` would never see the shards stop).
            env=dict(os.environ, RUST_BACKTRACE="0", FRESHET_IDLE_SEAL_MS="0"),
        )
        violations = []
        try:
            nodes = wait_cluster(up, data, timeout=90)
            by_role = collections.defaultdict(list)
            for n in nodes:
                by_role[n["role"]].append(n["grpc"])
            targets = {
                "freshet.ps.v1.ParameterService": by_role["ps"],
                "freshet.admin.v1.Admin": by_role["ps"],
                "freshet.admin.v1.NodeStatus": by_role["ps"],
                "freshet.coord.v1.Coordinator": by_role["ps"],
                "freshet.gateway.v1.Gateway": by_role["gateway"],
                "freshet.worker.v1.Worker": by_role["worker"],
            }
            methods = []
            for m in mods:
                for svc in m.DESCRIPTOR.services_by_name.values():
                    if svc.full_name not in targets:
                        continue
                    for meth in svc.methods:
                        methods.append((svc.full_name, meth))
            channels = {a: grpc.insecure_channel(a) for addrs in targets.values() for a in addrs}
            admin_addr = by_role["ps"][0]
            status_req = next(m for m in mods if hasattr(m, "ClusterStatusRequest")).ClusterStatusRequest
            status_resp = next(m for m in mods if hasattr(m, "ClusterStatusResponse")).ClusterStatusResponse

            def checksums():
                call = channels[admin_addr].unary_unary(
                    "/freshet.admin.v1.Admin/ClusterStatus",
                    request_serializer=lambda m: m.SerializeToString(),
                    response_deserializer=status_resp.FromString,
                )
                for _ in range(50):
                    try:
                        r = call(status_req(with_checksum=True), timeout=10)
                        return {
                            (s.shard, rep.node_id): (rep.checksum, rep.applied_index, rep.sealed_epoch)
                            for s in r.shards
                            if s.shard != 2**32 - 1
                            for rep in s.replicas
                        }
                    except grpc.RpcError:
                        time.sleep(0.2)
                raise SystemExit("ClusterStatus did not answer")

            pids = cluster_pids(up.pid)
            rss0 = {p: rss_kib(p) for p in pids}
            codes = collections.Counter()
            per_method = collections.defaultdict(collections.Counter)
            window_ok = False
            window_calls = []
            before = checksums()
            state_changes = 0
            windows_checked = 0
            checked_phase = args.inputs * 9 // 10
            timeline, t0 = [], time.time()
            for i in range(args.inputs):
                svc, meth = rng.choice(methods)
                while i < checked_phase and meth.name in META_WRITES:
                    svc, meth = rng.choice(methods)
                kind = rng.choice(["random", "semantic", "mutated"])
                if meth.name in MEMBERSHIP:
                    kind = "semantic"
                msg = semantic(rng, meth.input_type)
                if meth.name in MEMBERSHIP:
                    for f in ("node_id", "to_node"):
                        if f in meth.input_type.fields_by_name:
                            setattr(msg, f, rng.choice([0, 1000, 2**64 - 1]))
                payload = msg.SerializeToString()
                if kind == "random":
                    payload = os.urandom(rng.choice([0, 1, 3, 16, 200, 5000]))
                elif kind == "mutated":
                    payload = mutate(rng, payload)
                addr = rng.choice(targets[svc])
                path = f"/{svc}/{meth.name}"
                ch = channels[addr]
                ident = lambda b: b
                code, detail = "OK", ""
                try:
                    if meth.client_streaming:
                        call = ch.stream_unary(path, request_serializer=ident, response_deserializer=ident)
                        call(iter([payload] * rng.choice([1, 3])), timeout=5)
                    elif meth.server_streaming:
                        call = ch.unary_stream(path, request_serializer=ident, response_deserializer=ident)
                        for k, _ in enumerate(call(payload, timeout=2)):
                            if k >= 2:
                                break
                    else:
                        call = ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)
                        call(payload, timeout=5)
                except grpc.RpcError as e:
                    code, detail = e.code().name, e.details() or ""
                if meth.server_streaming and code == "DEADLINE_EXCEEDED":
                    code = "OK"  # a subscription that stayed open
                codes[code] += 1
                per_method[f"{svc.split('.')[-1]}/{meth.name}"][code] += 1
                if code not in ALLOWED:
                    violations.append(f"{path} ({kind}) answered {code}: {detail[:200]}")
                if len(detail.encode()) > MESSAGE_BYTES_MAX:
                    violations.append(f"{path} ({kind}) message of {len(detail)} bytes")
                if code == "INVALID_ARGUMENT" and ":" not in detail:
                    violations.append(f"{path} ({kind}) INVALID_ARGUMENT names no field: {detail[:200]}")
                window_ok |= code == "OK" and meth.name not in READS
                window_calls.append(f"{meth.name}:{kind}:{code}")
                if (i + 1) % WINDOW == 0 and i < checked_phase:
                    after = checksums()
                    if window_ok:
                        # An accepted write takes effect at a later seal: wait until the
                        # shards stop changing before the next window starts.
                        after = settled(checksums)
                    else:
                        windows_checked += 1
                        for k, (sum_before, applied, sealed) in before.items():
                            if k in after and after[k][0] != sum_before:
                                state_changes += 1
                                calls = ", ".join(window_calls)
                                violations.append(
                                    f"shard {k[0]} on node {k[1]} changed in a window of rejected calls "
                                    f"(applied {applied} -> {after[k][1]}, sealed epoch {sealed} -> {after[k][2]}): {calls}"
                                )
                    before, window_ok, window_calls = after, False, []
                if up.poll() is not None:
                    violations.append(f"freshet up exited with {up.returncode} during the run")
                    break
                if (i + 1) % max(1, args.inputs // 10) == 0:
                    # A timeline tells allocator warm-up (growth that stops) from a leak.
                    now = {p: rss_kib(p) for p in pids}
                    timeline.append((i + 1, time.time() - t0, now))
                    print(f"after {i + 1} inputs ({time.time() - t0:.0f} s): RSS MiB "
                          + ", ".join(f"{cmd(p)} {(now[p] or 0) / 1024:.1f}" for p in pids), flush=True)
            dead = [p for p in pids if rss_kib(p) is None]
            if dead:
                violations.append(f"processes gone after the run: {dead}")
            growth = {p: ((rss_kib(p) or 0) - (rss0[p] or 0)) / 1024 for p in pids}
            health = subprocess.run(
                ["grpcurl", "-plaintext", by_role["gateway"][0], "grpc.health.v1.Health/Check"],
                capture_output=True, text=True, timeout=30,
            )
            if health.returncode == 0 and "SERVING" not in health.stdout:
                violations.append(f"gateway health after the run: {health.stdout}")
            print(f"fuzz: {args.inputs} inputs (seed {args.seed}) against {len(methods)} methods on {len(pids)} processes")
            print("| method | " + " | ".join(sorted(codes)) + " |")
            print("|---|" + "---|" * len(codes))
            for name in sorted(per_method):
                print(f"| {name} | " + " | ".join(str(per_method[name][c]) for c in sorted(codes)) + " |")
            print(f"| all | " + " | ".join(str(codes[c]) for c in sorted(codes)) + " |")
            print(f"crashes: {len(dead)}; state changes from rejected input: {state_changes} "
                  f"(windows of {WINDOW} rejected calls checked: {windows_checked}); "
                  f"largest RSS growth of a process: {max(growth.values(), default=0):.1f} MiB "
                  f"({', '.join(f'{cmd(p)} {g:+.1f}' for p, g in growth.items())})")
            if len(timeline) >= 2:
                first = timeline[0][2]
                late = {p: ((rss_kib(p) or 0) - (first[p] or 0)) / 1024 for p in pids}
                print(f"RSS growth after the first tenth of the run ({timeline[0][0]} inputs): "
                      f"largest {max(late.values(), default=0):.1f} MiB "
                      f"({', '.join(f'{cmd(p)} {g:+.1f}' for p, g in late.items())})")
        finally:
            if up.poll() is None:
                up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
            if violations:
                print((pathlib.Path(tmp) / "up.log").read_text()[-3000:], file=sys.stderr)
        if violations:
            for v in violations[:30]:
                print("VIOLATION:", v, file=sys.stderr)
            sys.exit(f"fuzz: {len(violations)} violations")
        print("fuzz: ok")


if __name__ == "__main__":
    main()
