"""Shared by the Python checks: wait for `freshet up` to list its whole cluster."""
import json
import sys
import time


def wait_cluster(up, data, timeout=60):
    """The nodes of `<data>/cluster.json` once it lists 3 PS nodes, a gateway and a
    worker; exits the script if `up` dies first or `timeout` seconds pass."""
    deadline = time.time() + timeout
    while True:
        try:
            nodes = json.loads((data / "cluster.json").read_text())["nodes"]
            roles = [n["role"] for n in nodes]
            if roles.count("ps") == 3 and "gateway" in roles and "worker" in roles:
                return nodes
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            pass
        if up.poll() is not None:
            sys.exit(f"freshet up exited with {up.returncode} while starting")
        if time.time() > deadline:
            sys.exit("freshet up did not start 3 PS nodes, a gateway and a worker")
        time.sleep(0.2)
