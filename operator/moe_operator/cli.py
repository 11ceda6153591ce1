"""``moe-operator``: run | render | crd | simulate.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int``; modules import their heavy dependencies inside ``run`` so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("moe_operator.runner", "run the operator against the current kubeconfig or in-cluster config"),
    "render": ("moe_operator.render", "print the children of a MoERouter file as a YAML stream, offline"),
    "crd": ("moe_operator.crd", "print the CustomResourceDefinition generated from the API models"),
    "simulate": ("moe_operator.scaling.simulate_cli", "replay a traffic trace through the scaling policies"),
}


def build_parser(command: str | None) -> argparse.ArgumentParser:
    """The parser; only the chosen subcommand's module is imported (the others stay cheap)."""
    parser = argparse.ArgumentParser(prog="moe-operator", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == command:
            module = importlib.import_module(module_name)
            module.add_arguments(sub)
            sub.set_defaults(handler=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    command = next((argument for argument in arguments if argument in SUBCOMMANDS), None)
    args = build_parser(command).parse_args(arguments)
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        sys.stderr.close()
        return 0
