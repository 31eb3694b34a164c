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
    # A launched worker (torch.distributed initialised, or a group a command closed itself) ends here, see
    # _end_process.
    if _close_process_group() or getattr(args, "_distributed_ended", False):
        _end_process(rc)
    return rc


def _close_process_group() -> bool:
    """End a multi-process run's communication: all processes meet, then the process group is destroyed, so no
    process leaves while another still talks to it.  Returns whether there was a group."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return False
    dist.barrier()
    dist.destroy_process_group()
    return True


def _end_process(rc: int):
    """Exit a launched worker process without interpreter teardown (Python's multiprocessing ends its child
    processes with ``os._exit`` too): join our threads, run the atexit handlers (logging and the like flush
    there), flush stdio, ``os._exit(rc)``.

    Why: ``destroy_process_group`` only forgets the groups; the gloo backend is freed, its worker and TCP-loop
    threads joined and sockets closed, when torch drops its last reference, and after a DTensor/FSDP2 run
    torch still holds some (a DeviceMesh keeps its groups, DTensor's thread-local sharding caches keep the
    mesh, and others not all traced).  Those threads were still running when a normal exit tore down the
    interpreter and then the C++ statics, in an order nobody controls and while the peer process exits too;
    about one two-process FSDP2 test run in ten was seen to abort at exit ("terminate called without an
    active exception") after all its work was written.  Without teardown there is nothing left to go wrong:
    every output is already on disk and closed.
    """
    import atexit
    import os
    import threading

    for t in threading.enumerate():
        if t is not threading.main_thread() and not t.daemon:
            t.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # closed or broken: nothing left to write
            pass
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
