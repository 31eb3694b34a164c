"""``copsd`` console script.

Subcommands live in ``copsd/commands/<name>.py``; each module defines ``NAME``, ``HELP``,
``add_arguments(parser)`` and ``run(args) -> int``.  They are discovered at start-up so that a
command's heavy imports happen only when it runs.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys


def _command_modules():
    import copsd.commands as pkg

    mods = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        mods.append(importlib.import_module(f"copsd.commands.{info.name}"))
    return mods


def build_parser():
    parser = argparse.ArgumentParser(prog="copsd", description="Constitutional On-Policy Safe Distillation")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        rc = int(args._run(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # user errors: one clear line, no traceback
        print(f"copsd {args.command}: error: {e}", file=sys.stderr)
        return 2
    _close_process_group()
    return rc


def _close_process_group():
    """End a multi-process run cleanly: all processes meet, then the process group is destroyed, so no process
    exits while another still talks to it (an early exit with the group alive can abort in its destructor)."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
