"""`slmpack operator`: run the kopf operator that reconciles SLMDeployments."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("--namespace", "-n", action="append", default=[], metavar="NS",
                       help="watch only this namespace (repeatable)")
    scope.add_argument("--all-namespaces", "-A", action="store_true", help="watch every namespace (the default)")
    parser.add_argument("--metrics-port", type=int, default=8080, help="Prometheus metrics port (0 = off)")
    parser.add_argument("--health-port", type=int, default=8081, help="liveness endpoint port, /healthz (0 = off)")
    parser.add_argument("--peering", default=None, metavar="NAME",
                        help="kopf peering object, so that only one of several operators acts at a time")


def run(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    import slmpack.controller.handlers  # noqa: F401  (registers the handlers)

    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(
        clusterwide=not args.namespace,
        namespaces=args.namespace or (),
        standalone=args.peering is None,
        peering_name=args.peering,
        liveness_endpoint=f"http://0.0.0.0:{args.health_port}/healthz" if args.health_port else None,
    )
    return 0
