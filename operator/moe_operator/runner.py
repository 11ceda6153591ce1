"""``moe-operator run``: the operator against the current kubeconfig or in-cluster config."""

from __future__ import annotations

import argparse
import logging

DEFAULT_LIVENESS = "http://0.0.0.0:8080/healthz"

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace", "-n", action="append", default=[], metavar="NS",
        help="serve this namespace (repeatable; glob patterns allowed)",
    )
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="serve the whole cluster (default)")
    parser.add_argument(
        "--liveness", default=DEFAULT_LIVENESS, metavar="URL",
        help=f"liveness endpoint to serve (default {DEFAULT_LIVENESS}; empty string: off)",
    )
    parser.add_argument(
        "--metrics-port", type=int, default=9090, metavar="N",
        help="port of the operator's own Prometheus /metrics (default 9090, 0=off)",
    )
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--peering", metavar="NAME", help="kopf peering object for several replicas (HA)")
    peering.add_argument("--standalone", action="store_true", help="no peering (default)")
    parser.add_argument("--priority", type=int, default=0, help="peering priority (higher wins)")
    parser.add_argument("--verbose", "-v", action="store_true", help="debug logging")


def run(args: argparse.Namespace) -> int:
    import kopf
    import prometheus_client

    if not 0 <= args.metrics_port <= 65535:
        raise SystemExit(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    kopf.configure(verbose=args.verbose)
    from moe_operator import handlers  # registers the handlers; reads the timer settings from env

    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port)
    clusterwide = args.all_namespaces or not args.namespace
    log.info(
        "serving %s; drift resync every %.0f s; metrics on %s",
        "all namespaces" if clusterwide else ", ".join(args.namespace),
        handlers.RESYNC_SECONDS,
        f":{args.metrics_port}/metrics" if args.metrics_port else "nothing",
    )
    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        priority=args.priority,
        liveness_endpoint=args.liveness or None,
        clusterwide=clusterwide,
        namespaces=() if clusterwide else tuple(args.namespace),
    )
    return 0
