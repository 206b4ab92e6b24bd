"""`absorber <verb>`: one command line for the whole project.

Each verb lives in its own module, which defines ``HELP`` (one line), ``add_arguments(parser)`` and
``main(args) -> int``. Modules import their heavy dependencies (torch, transformers) inside ``main`` only,
so that `absorber run` and `absorber devices` work on a device install without torch.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from absorber.errors import AbsorberError

# verb -> module; order is the order shown by --help
VERBS: dict[str, str] = {
    "absorb": "absorber.commands.absorb",
    "export": "absorber.export.command",
    "run": "absorber.runtime.command",
    "serve": "absorber.runtime.server.command",
    "devices": "absorber.devices.command",
    "plan": "absorber.devices.plan_command",
    "eval": "absorber.commands.eval",
    "bench": "absorber.commands.bench",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="absorber",
        description="Absorber LLM on device: read an endless text stream in constant memory by absorbing old "
                    "context into LoRA weights (causal synchronization), in PyTorch or on ONNX Runtime alone.",
    )
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for verb, modname in VERBS.items():
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as e:  # a verb whose module is not there yet, or whose deps are missing
            if e.name and modname.startswith(e.name):
                continue
            raise
        p = sub.add_parser(verb, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_main=mod.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_main", None):
        parser.print_help()
        return 0
    try:
        return int(args._main(args) or 0)
    except AbsorberError as e:
        print(f"absorber {args.verb}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"absorber {args.verb}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
