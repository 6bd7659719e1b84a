# Vowpal Wabbit side of `freshet sim`: one JSON request per line on stdin, one JSON
# answer per line on stdout. Each slot of a slate is a contextual-bandit decision over
# the items not shown yet (shared: the user's fields and the slot; actions: the item's
# fields and id); each slot learns from its own click (cost -1 for a click, 0 otherwise,
# with the probability VW gave the chosen item).
import json
import sys


def feature(s):
    return s.replace(" ", "_").replace(":", "_").replace("|", "_")


def shared(users, m):
    # The user's fields, and their id where users have one (returning users).
    uid = m.get("uid")
    return users[m["user"]] + (f" uid={feature(uid)}" if uid else "")


def main():
    try:
        import vowpalwabbit
    except ImportError as e:
        print(json.dumps({"error": f"python3 cannot import vowpalwabbit ({e}); "
                          "install it (pip install vowpalwabbit==9.11.9) or run freshet sim --no-vw"}), flush=True)
        return
    vw, items, users = None, [], []
    for line in sys.stdin:
        m = json.loads(line)
        op = m["op"]
        if op == "init":
            vw = vowpalwabbit.Workspace(m["args"] + " --quiet")
            items = ["|i " + " ".join(feature(f) for f in it) for it in m["items"]]
            users = ["shared |u " + " ".join(feature(f) for f in u) for u in m["users"]]
            out = {"ok": True}
        elif op == "rank":
            remaining = list(range(m["active"]))
            slate = []
            for p in range(m["k"]):
                ex = [f"{shared(users, m)} |p slot{p}"] + [items[i] for i in remaining]
                pmf = vw.predict(ex)
                r, acc, j = m["u"][p] * sum(pmf), 0.0, len(pmf) - 1
                for k, q in enumerate(pmf):
                    acc += q
                    if r < acc:
                        j = k
                        break
                slate.append([remaining[j], pmf[j] / max(sum(pmf), 1e-12)])
                remaining.pop(j)
            out = {"slate": slate}
        elif op == "learn":
            remaining = list(range(m["active"]))
            for p, (chosen, prob, click) in enumerate(m["slots"]):
                cost = -1.0 if click else 0.0
                ex = [f"{shared(users, m)} |p slot{p}"]
                for i in remaining:
                    label = f"0:{cost}:{max(prob, 1e-6)} " if i == chosen else ""
                    ex.append(label + items[i])
                vw.learn(ex)
                remaining.remove(chosen)
            out = {"ok": True}
        else:
            out = {"error": f"unknown op {op}"}
        print(json.dumps(out), flush=True)


main()
