#!/usr/bin/env python3
"""Offline checks of the deploy assets (run by CI).

1. hadolint on the Dockerfile.
2. Render every kustomize overlay and validate it with kubernetes-validate --strict.
3. Run each rendered container's args (PS StatefulSet, gateway and worker Deployments)
   through its binary's `--check-config`, with the overlay's rendered cluster config, so
   manifests and binary flags cannot drift.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S_VERSION = "1.33.0"


def run(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def render(overlay):
    if shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(overlay)]
    elif shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(overlay)]
    else:
        sys.exit("neither kubectl nor kustomize is installed")
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def check_deployment_args(docs, bin_dir):
    checked = 0
    for d in docs:
        if d["kind"] != "Deployment":
            continue
        for c in d["spec"]["template"]["spec"]["containers"]:
            binary = pathlib.Path(c.get("command", ["/usr/local/bin/freshet-server"])[0]).name
            args = [
                a.replace("$(POD_IP)", "10.0.0.1").replace("$(POD_NAME)", d["metadata"]["name"] + "-x")
                for a in c["args"]
            ]
            run([str(bin_dir / binary), *args, "--check-config"], stdout=subprocess.DEVNULL)
            checked += 1
    return checked


def check_ps_args(docs, server_bin, workdir):
    cms = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    checked = 0
    for d in docs:
        if d["kind"] != "StatefulSet":
            continue
        spec = d["spec"]["template"]["spec"]
        mounts = {v["name"]: v["configMap"]["name"] for v in spec.get("volumes", []) if "configMap" in v}
        for c in spec["containers"]:
            args = list(c["args"])
            mount_dirs = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            fixed = []
            for a in args:
                a = a.replace("$(POD_NAME)", d["metadata"]["name"] + "-0")
                if a.startswith("--cluster-config="):
                    path = pathlib.Path(a.split("=", 1)[1])
                    cm = cms[mounts[mount_dirs[str(path.parent)]]]
                    local = workdir / "cluster.json"
                    local.write_text(cm["data"][path.name])
                    a = f"--cluster-config={local}"
                if a.startswith("--data-dir="):
                    a = f"--data-dir={workdir / 'data'}"
                fixed.append(a)
            env = dict(os.environ, HOSTNAME=d["metadata"]["name"] + "-0")
            run([server_bin, *fixed, "--check-config"], env=env, stdout=subprocess.DEVNULL)
            checked += 1
    return checked


def main():
    server_bin = ROOT / "target" / "debug" / "freshet-server"
    if len(sys.argv) > 1:
        server_bin = pathlib.Path(sys.argv[1])
    run(["hadolint", str(ROOT / "deploy" / "docker" / "Dockerfile")])
    overlays = sorted((ROOT / "deploy" / "k8s" / "overlays").iterdir())
    for overlay in overlays:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = pathlib.Path(tmp)
            rendered = tmp / f"{overlay.name}.yaml"
            rendered.write_text(render(overlay))
            run(["kubernetes-validate", "--strict", "-k", K8S_VERSION, str(rendered)])
            docs = [d for d in yaml.safe_load_all(rendered.read_text()) if d]
            n = check_ps_args(docs, str(server_bin), tmp)
            if n == 0:
                sys.exit(f"{overlay.name}: no PS container found")
            m = check_deployment_args(docs, server_bin.parent)
            if m < 2:
                sys.exit(f"{overlay.name}: expected gateway and worker Deployments")
            n += m
            print(f"{overlay.name}: {len(docs)} objects valid, {n} container arg sets accepted")


if __name__ == "__main__":
    main()
