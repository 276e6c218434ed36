"""`slmpack engine -- COMMAND...`: run a GPU engine pinned to the GPUs its container was given.

Under the device plugin's MPS a client sees every GPU of the node (core/gpu_pin.py), so the engine's
CUDA_VISIBLE_DEVICES is set to the UUIDs the container was given before the command replaces this process.
"""

from __future__ import annotations

import argparse
import logging
import os

from slmpack.adapters.gpu_devices import pinned_environment

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("engine_command", nargs=argparse.REMAINDER,
                        help="the engine's command and arguments, after --")


def run(args: argparse.Namespace) -> int:
    command = args.engine_command[1:] if args.engine_command[:1] == ["--"] else args.engine_command
    if not command:
        raise SystemExit("slmpack engine: give the engine's command after --")
    env, pin = pinned_environment()
    log.info("GPU: %s%s", pin.reason, f" (CUDA_VISIBLE_DEVICES={pin.devices})" if pin.devices else "")
    os.execvpe(command[0], command, env)
