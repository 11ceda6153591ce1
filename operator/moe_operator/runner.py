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


#: What kopf logs at INFO on every timer tick and child event: at 200 MoERouters, over a thousand lines a
#: minute that say nothing (failures are logged at ERROR, and the operator logs each write it makes).
ROUTINE_MESSAGES = ("Timer 'predictive' succeeded.", "Timer 'drift' succeeded.")
ROUTINE_PREFIX = "Handler 'watch-"


class RoutineFilter(logging.Filter):
    """Drops kopf's per-tick and per-child-event success lines (INFO); everything else passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        message = record.getMessage()
        watch_success = message.startswith(ROUTINE_PREFIX) and message.endswith(" succeeded.")
        return not (message in ROUTINE_MESSAGES or watch_success)


def quiet_routine_logs(verbose: bool) -> None:
    """Keep the default log to what a person reads: no per-tick successes, no access line per liveness probe."""
    if verbose:
        return
    logging.getLogger("kopf.objects").addFilter(RoutineFilter())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    import kopf
    import prometheus_client

    if not 0 <= args.metrics_port <= 65535:
        raise SystemExit(f"--metrics-port must be 0..65535, got {args.metrics_port}")
    kopf.configure(verbose=args.verbose)
    quiet_routine_logs(args.verbose)
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
