"""`slmpack operator | render | profile | analyze | exporter | router-agent | engine | supervise | crds`.

Each subcommand lives in its own wing module, which exposes `configure(parser)`
and `run(args) -> int`. Only the chosen wing is imported, so that `slmpack crds`
never pays for vLLM and `slmpack exporter` never for kopf.
"""

import argparse
import importlib
import logging
import sys

import slmpack

SUBCOMMANDS = {
    "operator": ("slmpack.controller.cli", "run the operator (kopf) that reconciles SLMDeployments"),
    "render": ("slmpack.controller.render",
               "print what the operator would create for an SLMDeployment on given Nodes, without a cluster"),
    "profile": ("slmpack.profiler.cli_profile",
                "profile an engine: sweep batch sizes, find the knee, measure replicas"),
    "analyze": ("slmpack.profiler.cli_analyze", "analyze existing `vllm bench serve` result files"),
    "exporter": ("slmpack.exporter.cli", "serve NVML power and energy metrics for Prometheus"),
    "router-agent": ("slmpack.router.agent",
                     "feed a router's HAProxy the ready engines of its deployment (runs in the router pod)"),
    "engine": ("slmpack.supervisor.engine", "run a GPU engine pinned to the GPUs its container was given"),
    "supervise": ("slmpack.supervisor.run",
                  "run a pack pod's engines (and its own MPS daemon), restart them, report their health, drain"),
    "crds": ("slmpack.api.crds", "print the CustomResourceDefinitions as YAML"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    chosen = next((word for word in argv if word in SUBCOMMANDS), None)
    parser = argparse.ArgumentParser(prog="slmpack", description=slmpack.__doc__)
    parser.add_argument("--log-level", default="INFO", help="logging level (default INFO)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(module_name=module_name)
        if name == chosen:
            importlib.import_module(module_name).configure(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # One line per request or probe drowns the rest.
    for chatty in ("httpx", "aiohttp.access"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    return importlib.import_module(args.module_name).run(args)


if __name__ == "__main__":
    sys.exit(main())
