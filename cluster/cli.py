"""The ``epserve`` command.

Every error a user can cause ends as one line on stderr (``epserve <command>: error: ...``) and a non-zero
exit status: 2 for bad input (options, settings, a checkpoint, a request), 1 when what it runs or talks to
fails (a server that cannot be reached or does not start, a benchmark with failed requests).

Each command imports what it runs when it runs (the imports inside the ``cmd_*`` functions): torch, Ray and
Serve take about 5 s to import on the 2-core build machine (torch 2.8 s, ray.serve 1.9 s, measured), which
``epserve client`` and ``--help`` should not pay.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import grpc
from epserve.actors.model import host_memory

from .config import ClusterConfig, cluster_settings
from .planning.options import add_options as add_plan_options
from .serving.config import ServerConfig
from .serving.security import TOKEN_ENV, load_token

DEFAULT_METRICS_PORT = 9477  # `epserve serve` opens it unless told otherwise (the app's setting has none)
RANDOM_WEIGHTS_NOTE = ("the built-in model has random weights: its answer is gibberish (with U+FFFD where its "
                       "bytes are not text), not a fault; `epserve serve --checkpoint DIR` serves a real model")


class CommandFailed(RuntimeError):
    """What the command ran or talked to failed: exit status 1, the message as one line."""


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated token ids, got {text!r}") from None


def cmd_make_checkpoint(args) -> int:
    from .fixtures.checkpoint import preset, write_checkpoint

    cfg = preset(args.preset)
    weights = args.preset != "gemma-4-26b-a4b" or args.weights
    t0 = time.monotonic()
    if args.router_skew < 0:
        raise ValueError(f"--router-skew {args.router_skew}: must be >= 0")
    out = write_checkpoint(cfg, args.out, seed=args.seed, layout=args.layout, weights=weights, progress=True,
                           router_skew=args.router_skew)
    what = "config and weights" if weights else "config only (add --weights for ~50 GB of random weights)"
    print(f"wrote {args.preset} ({args.layout} layout, {what}) to {out} in {time.monotonic() - t0:.1f}s")
    return 0


def cmd_generate(args) -> int:
    import torch

    from epserve.actors.engine.engine import LLMEngine
    from epserve.actors.engine.sampling import SamplingParams
    from epserve.actors.model.loader import load_model
    from epserve.actors.model.precision import resolve_dtype

    from .fixtures.builtin import checkpoint_or_builtin
    from .launcher import Cluster

    checkpoint = checkpoint_or_builtin(args.checkpoint)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed,
                            ignore_eos=args.ignore_eos)
    if args.shards:  # through the cluster: M Frontend actors and N ExpertShard actors
        cfg = ClusterConfig(checkpoint=checkpoint, shards=args.shards, address=args.address, dtype=args.dtype,
                            **cluster_settings(args))
        with Cluster(cfg) as cluster:
            results = [(o["token_ids"], o["finish_reason"]) for o in cluster.generate(args.prompt_ids, params)]
    else:
        cluster_settings(args)  # refuses expert placement options without shards
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(checkpoint, dtype=resolve_dtype(args.dtype, device), device=device)
        results = [(o.token_ids, o.finish_reason) for o in LLMEngine(model).generate(args.prompt_ids, params)]
    for token_ids, reason in results:
        if args.json:
            print(json.dumps({"token_ids": token_ids, "finish_reason": reason}))
        else:
            print(",".join(map(str, token_ids)))
    return 0


def server_config(args) -> ServerConfig:
    """The server's settings from the options of ``serve`` (``demo`` has fewer: the rest keep defaults)."""
    options = vars(args)
    cert, key = options.get("tls_cert"), options.get("tls_key")
    if bool(cert) != bool(key):
        raise ValueError("--tls-cert and --tls-key go together")
    tls = {"tls_cert_file": os.path.abspath(cert), "tls_key_file": os.path.abspath(key)} if cert else {}
    cluster = ClusterConfig(checkpoint=options.get("checkpoint"), shards=args.shards, address=options.get("address"),
                            dtype=args.dtype, **cluster_settings(args))
    return ServerConfig(cluster=cluster, grpc_host=args.host, grpc_port=args.grpc_port, metrics_host=args.host,
                        metrics_port=options.get("metrics_port") or None,
                        drain_s=options.get("drain_s", ServerConfig.drain_s), **tls,
                        **_token_source(options.get("auth_token_file")))


def _token_source(token_file: str | None) -> dict:
    """Where the server's replica finds the bearer token: the file, or else EPSERVE_AUTH_TOKEN when this
    process has it (a Ray cluster started here passes its environment on). Never the value itself: the app's
    settings are stored by Ray and shown by its dashboard. Checked here, so that a bad source fails at once."""
    source = {"auth_token_file": os.path.abspath(token_file)} if token_file else \
        {"auth_token_env": TOKEN_ENV} if os.environ.get(TOKEN_ENV) else {}
    load_token(source.get("auth_token_file"), source.get("auth_token_env"))
    return source


def _client_token(token_file: str | None) -> str | None:
    return load_token(token_file) if token_file else os.environ.get(TOKEN_ENV) or None


def _install_sigterm() -> None:
    """SIGTERM stops like Ctrl-C. Installed after ray.init, which sets a handler of its own that aborts."""

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _ignore_signals() -> None:
    """While shutting down (bounded by --drain-s): a second Ctrl-C / SIGTERM must not cut the cleanup short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _start(server) -> None:
    """Start the server, its start's failure as a CommandFailed."""
    from .serving.local import StartFailed

    try:
        server.start()
    except StartFailed as e:
        raise CommandFailed(str(e)) from None


def cmd_serve(args) -> int:
    from .serving.local import LocalServer

    config = server_config(args)
    server = LocalServer(config, args.host, args.http_port)
    scheme = "https" if config.tls else "http"
    try:
        _start(server)
        _install_sigterm()
        print(f"epserve is serving: gRPC on {server.grpc_target} (epserve.v1.Inference, health, reflection"
              f"{', TLS' if scheme == 'https' else ''}); OpenAI HTTP on {scheme}://{args.host}:{args.http_port}/v1"
              f"{' (bearer token required)' if config.needs_token else ''} . Ctrl-C to stop.", flush=True)
        if server.metrics_url:
            print(f"Prometheus metrics on {server.metrics_url} (also /metrics on the HTTP port)", flush=True)
        # short sleeps: a process-wide signal may be delivered to any of the server's threads (gRPC, Ray),
        # and then only sets a flag that the main thread checks when its sleep returns, which a long sleep
        # would not do for an hour
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        _ignore_signals()
        print(f"shutting down: draining requests in flight (up to {config.drain_s:g} s) ...", file=sys.stderr,
              flush=True)
    finally:
        server.shutdown()
    return 0


def cmd_client(args) -> int:
    from .tools import client

    req = client.request(args.prompt, args.prompt_ids, args.max_tokens, args.temperature, args.seed,
                         args.ignore_eos)
    try:
        pieces = client.stream(args.address, req, args.timeout, ca_file=args.tls_ca,
                               token=_client_token(args.auth_token_file))
    except grpc.RpcError as e:
        raise CommandFailed(f"{args.address}: {e.code().name}: {e.details()}") from None
    last = pieces[-1] if pieces else None
    if last is not None:
        print(f"[request {last.request_id}: {last.usage.prompt_tokens} prompt + {last.usage.completion_tokens} "
              f"generated tokens]", file=sys.stderr)
    return 0


def cmd_experts(args) -> int:
    from .tools import experts

    try:
        reply = experts.fetch(args.address, args.timeout, ca_file=args.tls_ca,
                              token=_client_token(args.auth_token_file))
    except grpc.RpcError as e:
        raise CommandFailed(f"{args.address}: {e.code().name}: {e.details()}") from None
    if args.save_placement:
        if not reply.num_shards:
            raise CommandFailed(f"{args.address} has no expert shards: no placement to save")
        Path(args.save_placement).write_text(json.dumps(experts.placement_json(reply)) + "\n")
    print(experts.as_json(reply) if args.json else experts.report(reply))
    return 0


def cmd_bench(args) -> int:
    from .tools import bench
    from .tools.bench_targets import RequestFailed

    try:
        return bench.main(args)
    except RequestFailed as e:
        raise CommandFailed(str(e)) from None


def cmd_plan(args) -> int:
    from .planning import command

    return command.main(args)


def cmd_demo(args) -> int:
    from .serving.local import LocalServer
    from .tools import client

    server = LocalServer(server_config(args), args.host, args.http_port)
    try:
        _start(server)
        _install_sigterm()
        print(f"server up: gRPC {server.grpc_target}, OpenAI HTTP http://{args.host}:{args.http_port}/v1",
              flush=True)
        print(f"prompt: {args.prompt!r}\n{RANDOM_WEIGHTS_NOTE}\nanswer (streamed):", flush=True)
        client.stream(server.grpc_target, client.request(args.prompt, max_tokens=args.max_tokens, ignore_eos=True))
    finally:
        server.shutdown()
    print("To keep serving, run `epserve serve` and talk to it with `epserve client --prompt ...` or any "
          "OpenAI client.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="epserve", description="Expert-parallel serving for Gemma 4 26B-A4B")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the real layout")
    p.add_argument("--preset", required=True, choices=["tiny", "bench", "gemma-4-26b-a4b"])
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layout", choices=["released", "text-only"], default="released")
    p.add_argument("--weights", action="store_true", help="also write weights for the gemma-4-26b-a4b preset")
    p.add_argument("--router-skew", type=float, default=0.0, metavar="S",
                   help="routers that send a few experts most of the traffic (0: uniform; 2-4: strongly skewed; "
                        "docs/experts.md)")
    p.set_defaults(func=cmd_make_checkpoint)

    def dtype_option(p):
        p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default=ClusterConfig.dtype,
                       help="compute dtype; auto: bf16 on GPUs and on CPUs with native bf16 arithmetic "
                            "(AMX-BF16, AVX512-BF16), else fp32")

    def cluster_options(p):
        p.add_argument("--frontends", type=int, default=ClusterConfig.frontends, metavar="M",
                       help="front-end actors over the one pool of expert shards, each with its own engine; new "
                            "requests go to the least loaded, with prefix affinity (default 1)")
        p.add_argument("--micro-batches", type=int, choices=[1, 2], default=ClusterConfig.micro_batches,
                       help="2: each front-end's step in two halves that take turns with the shards (ping-pong; "
                            "default 1)")
        p.add_argument("--redundant-experts", type=int, default=ClusterConfig.redundant_experts, metavar="R",
                       help="R extra expert slots per layer on the shards, holding replicas (default 0)")
        p.add_argument("--rebalance-interval-s", type=float, default=ClusterConfig.rebalance_interval_s,
                       metavar="S", help="every S seconds, move experts (and their replicas) to balance the shards "
                                         "by the measured load, while serving (default 0: off)")
        p.add_argument("--expert-placement", "--placement", metavar="FILE",
                       help='pin where each expert lives: JSON {"shards": [[experts of shard 0], ...]} or '
                            '{"layers": [[[...], ...], ...]} (docs/experts.md)')

    def sampling_options(p, max_tokens):
        p.add_argument("--max-tokens", type=int, default=max_tokens)
        p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
        p.add_argument("--seed", type=int)
        p.add_argument("--ignore-eos", action="store_true")

    p = sub.add_parser("generate", help="generate from token ids (several --prompt-ids run as one batch)")
    p.add_argument("--checkpoint", help="checkpoint directory (default: a built-in tiny model)")
    p.add_argument("--prompt-ids", type=_ids, action="append", required=True,
                   help="comma-separated token ids (repeat for a batch)")
    sampling_options(p, 16)
    p.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    p.add_argument("--shards", type=int, default=0,
                   help="run through a cluster of N expert-shard actors (default 0: in this process)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    dtype_option(p)
    cluster_options(p)
    p.set_defaults(func=cmd_generate)

    def server_options(p, shards=ClusterConfig.shards):
        p.add_argument("--shards", type=int, default=shards, help="expert-shard actors")
        p.add_argument("--host", default=ServerConfig.grpc_host, help="address gRPC and HTTP listen on")
        p.add_argument("--grpc-port", type=int, default=ServerConfig.grpc_port)
        p.add_argument("--http-port", type=int, default=8000)
        dtype_option(p)
        cluster_options(p)

    p = sub.add_parser("serve", help="serve gRPC and OpenAI HTTP until interrupted")
    p.add_argument("--checkpoint", help="checkpoint directory (default: a built-in tiny model)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    server_options(p)
    p.add_argument("--metrics-port", type=int, default=DEFAULT_METRICS_PORT,
                   help="Prometheus scrape target for the whole cluster, on --host (0: none; /metrics on the "
                        "HTTP port either way)")
    p.add_argument("--drain-s", type=float, default=ServerConfig.drain_s,
                   help="on SIGTERM / Ctrl-C: refuse new requests and let those in flight finish for up to this "
                        f"long, then end them with UNAVAILABLE / 503 (default {ServerConfig.drain_s:g})")
    p.add_argument("--tls-cert", help="PEM certificate (chain): gRPC over TLS and HTTPS (with --tls-key)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--auth-token-file", help="require this file's bearer token on every inference call (or set "
                                             "EPSERVE_AUTH_TOKEN); health checks stay open")
    p.set_defaults(func=cmd_serve)

    def connection_options(p, timeout_s: float):
        p.add_argument("--address", default=ServerConfig().grpc_target, help="gRPC host:port")
        p.add_argument("--timeout", type=float, default=timeout_s, help="gRPC deadline in seconds")
        p.add_argument("--tls-ca", help="connect over TLS, verifying the server against this PEM certificate")
        p.add_argument("--auth-token-file", help="send this file's bearer token (default: EPSERVE_AUTH_TOKEN if "
                                                 "set)")

    p = sub.add_parser("client", help="send a prompt over gRPC and stream the answer")
    connection_options(p, 120.0)
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text (needs a model with a tokenizer)")
    prompt.add_argument("--prompt-ids", type=_ids, help="comma-separated token ids")
    sampling_options(p, 32)
    p.set_defaults(func=cmd_client)

    p = sub.add_parser("experts", help="print a server's expert placement and the load per shard and expert")
    connection_options(p, 30.0)
    p.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    p.add_argument("--save-placement", metavar="FILE", help="also write the placement as --placement takes it")
    p.set_defaults(func=cmd_experts)

    p = sub.add_parser("bench", help="drive a workload against a server on 127.0.0.1 or an in-process engine")
    p.add_argument("--target", help=f"grpc://{ServerConfig().grpc_target} (ours) or http://127.0.0.1:8000 (any "
                                    "OpenAI-compatible server); default: an engine in this process (--shards N: "
                                    "a cluster)")
    p.add_argument("--checkpoint", help="for the in-process engine (default: the built-in tiny model)")
    p.add_argument("--shards", type=int, default=0, help="in-process target: N expert-shard actors (0: none)")
    dtype_option(p)
    cluster_options(p)
    p.add_argument("--model", help="OpenAI model name (default: the server's first model)")
    p.add_argument("--requests", type=int, default=64, help="requests per run")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--random-lengths", action="store_true", help="lengths uniform in [len/2, 3*len/2]")
    p.add_argument("--concurrency", type=_ids, default=[64],
                   help="requests in flight; a comma-separated list runs a sweep (default 64)")
    p.add_argument("--rate", type=float, help="open loop: Poisson arrivals at this many requests/s")
    p.add_argument("--duration-s", type=float, help="stop sending after this many seconds per run")
    p.add_argument("--warmup", type=int, default=2, help="short requests sent first, not measured")
    p.add_argument("--vocab-size", type=int, help="prompt ids are drawn below this (default: the served model's "
                                                  "vocabulary, as the server or engine says)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="write a PNG of throughput and latency against concurrency here")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("plan", help="memory per rank and predicted speed of a layout (GPUs or this machine)")
    add_plan_options(p)
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("demo", help="start a local cluster, answer one prompt, stop")
    p.add_argument("--prompt", default="The expert-parallel cluster says")
    p.add_argument("--max-tokens", type=int, default=24)
    server_options(p)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:  # RequestError, ConfigError, CheckpointError and a busy port are ValueErrors
        print(f"epserve {args.command}: error: {e}", file=sys.stderr)
        return 2
    except CommandFailed as e:
        print(f"epserve {args.command}: error: {e}", file=sys.stderr)
        return 1


def program() -> int:
    """The ``epserve`` program (``main`` in a process of its own): its malloc keeps the memory it frees, set
    before any thread starts (actors/model/host_memory.py), for the engine that ``generate`` and ``bench`` run here."""
    host_memory.keep_freed_memory()
    return main()


if __name__ == "__main__":
    sys.exit(program())
