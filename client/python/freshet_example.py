#!/usr/bin/env python3
"""A Freshet client in Python: Rank, then Feedback on the top item.

Stubs are generated from the repository's proto/ with grpcio-tools (into a cache dir) the
first time it runs:

    pip install grpcio-tools
    python3 client/python/freshet_example.py 127.0.0.1:<gateway port>
"""
import pathlib
import sys
import tempfile
import uuid

ROOT = pathlib.Path(__file__).resolve().parents[2]
PROTO = ROOT / "proto" / "proto"


def load_stubs():
    out = pathlib.Path(tempfile.gettempdir()) / "freshet-python-stubs"
    out.mkdir(exist_ok=True)
    from grpc_tools import protoc

    files = [str(p) for p in sorted(PROTO.glob("*.proto"))]
    rc = protoc.main(["protoc", f"-I{PROTO}", f"--python_out={out}", f"--grpc_python_out={out}", *files])
    if rc != 0:
        sys.exit(f"protoc failed ({rc})")
    sys.path.insert(0, str(out))
    import gateway_pb2
    import gateway_pb2_grpc
    import ps_pb2

    return gateway_pb2, gateway_pb2_grpc, ps_pb2


def main():
    if len(sys.argv) != 2:
        sys.exit("usage: freshet_example.py <gateway host:port>")
    import grpc

    gw_pb, gw_grpc, ps_pb = load_stubs()
    channel = grpc.insecure_channel(sys.argv[1])
    gw = gw_grpc.GatewayStub(channel)
    gw.UpsertItems(
        gw_pb.UpsertItemsRequest(
            items=[ps_pb.Item(id=i, features=[f"brand={i % 3}"], active=True) for i in range(1, 11)]
        ),
        timeout=10,
    )
    # Items are rankable from the next sealed epoch: retry briefly.
    import time

    deadline = time.time() + 30
    while True:
        try:
            ranked = gw.Rank(
                gw_pb.RankRequest(
                    user=gw_pb.UserContext(categorical={"segment": "python"}, numeric=[0.2]),
                    candidates=list(range(1, 11)),
                    k=3,
                ),
                timeout=5,
            )
            break
        except grpc.RpcError as e:
            if time.time() > deadline or e.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                raise
            time.sleep(0.2)
    top = ranked.items[0]
    print(f"epoch {ranked.epoch}: top item {top.item_id} (propensity {top.propensity:.3f})")
    ack = gw.Feedback(
        gw_pb.FeedbackRequest(
            events=[
                gw_pb.FeedbackEvent(
                    event_id=str(uuid.uuid4()),
                    impression_id=ranked.impression_id,
                    item_id=top.item_id,
                    position=top.position,
                    rewards=[gw_pb.Reward(kind=gw_pb.REWARD_KIND_CLICK)],
                )
            ]
        ),
        timeout=30,
    )
    print(f"feedback accepted={ack.accepted} sealed in epoch {ack.sealed_epoch}")
    if len(ranked.items) != 3 or ack.accepted != 1 or ack.sealed_epoch == 0:
        sys.exit("unexpected answers")


if __name__ == "__main__":
    main()
