"""Where the gRPC endpoint should live: a grpc.aio server inside the Serve ingress replica (what epserve
does) against Serve's own gRPC proxy, both answering the same trivial unary call (ModelInfo) on 127.0.0.1.

    python benchmarks/grpc_latency.py [--calls 300]

Also times a one-token Complete through our endpoint (gRPC + the engine). Records docs/grpc.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")

import grpc  # noqa: E402
import ray  # noqa: E402
from ray import serve  # noqa: E402

from common import ROOT, free_port, git_revision, machine  # noqa: E402

from epserve.cluster.api import inference_pb2 as pb  # noqa: E402
from epserve.cluster.api import inference_pb2_grpc as pb_grpc  # noqa: E402


def timed(fn, calls: int) -> dict:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        samples.append(1000 * (time.perf_counter() - t0))
    samples.sort()
    return {"p50": statistics.median(samples), "p90": samples[int(0.9 * len(samples))],
            "p99": samples[int(0.99 * len(samples)) - 1]}


@serve.deployment
class ProxyProbe:
    def ModelInfo(self, request):
        return pb.ModelInfoResponse(model_name="probe")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    from epserve.cluster.serving.local import LocalServer

    ray.init(namespace="epserve", include_dashboard=False, log_to_driver=False)
    proxy_port = free_port()
    serve.start(grpc_options={"port": proxy_port, "grpc_servicer_functions": [
        "epserve.cluster.api.inference_pb2_grpc.add_InferenceServicer_to_server"]},
        http_options={"host": "127.0.0.1", "port": free_port()})
    settings = {"cluster": {"shards": 2}, "grpc_port": free_port()}
    server = LocalServer(settings, "127.0.0.1", free_port()).start()
    serve.run(ProxyProbe.bind(), name="probe", route_prefix="/probe")
    results = {}
    with grpc.insecure_channel(server.grpc_target) as ours, \
            grpc.insecure_channel(f"127.0.0.1:{proxy_port}") as proxied:
        ours_stub, proxy_stub = pb_grpc.InferenceStub(ours), pb_grpc.InferenceStub(proxied)
        results["grpc.aio in the ingress replica: ModelInfo"] = timed(
            lambda: ours_stub.ModelInfo(pb.ModelInfoRequest(), timeout=10), args.calls)
        results["Serve's gRPC proxy -> replica: ModelInfo"] = timed(
            lambda: proxy_stub.ModelInfo(pb.ModelInfoRequest(), timeout=10, metadata=(("application", "probe"),)),
            args.calls)
        one = pb.GenerateRequest(token_ids=pb.TokenIds(ids=[2, 17, 300]),
                                 sampling=pb.SamplingParams(max_tokens=1))
        results["grpc.aio in the ingress replica: Complete, 1 token (engine included)"] = timed(
            lambda: ours_stub.Complete(one, timeout=30), max(30, args.calls // 5))
    serve.delete("probe")
    server.shutdown()
    ray.shutdown()
    rows = "\n".join(f"| {k} | {v['p50']:.2f} ms | {v['p90']:.2f} ms | {v['p99']:.2f} ms |" for k, v in results.items())
    for k, v in results.items():
        print(k, v)
    body = f"""# gRPC endpoint: where it listens, and why

epserve serves `epserve.v1.Inference` from a **grpc.aio server inside the Serve ingress replica** (the same
replica that brings up the cluster and serves the OpenAI HTTP API through Serve's HTTP proxy). Serve's own gRPC
proxy was the alternative; it adds a hop (client -> proxy actor -> replica), and its standard health checks
need extra work, while a grpc.aio server offers `grpc.health.v1` and server reflection natively. The cost of
the hop, measured here on the same trivial unary call:

Command: `python benchmarks/grpc_latency.py --calls {args.calls}` (revision {git_revision()}; {machine()}).

| path | p50 | p90 | p99 |
|---|---|---|---|
{rows}

Consequences of the choice: the gRPC port is the ingress replica's (default 50051; `grpc_port` in the Serve
config), so on Kubernetes the gRPC Service targets the pod that runs the ingress replica, not a `serve-grpc`
port of Serve's proxy. One ingress replica serves the whole cluster (there is one front-end actor).
"""
    print(body)
    if not args.no_write:
        (ROOT / "docs" / "grpc.md").write_text(body)


if __name__ == "__main__":
    main()
