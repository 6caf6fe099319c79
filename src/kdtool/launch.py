"""The ``kdtool`` console script and ``python -m kdtool``: glibc's start-up settings, then the CLI.

Kept apart from ``kdtool.cli`` so that the re-execution ``kdtool.allocator`` asks for (glibc's tcache
can only be switched off when a process starts) happens before typer, rich and pydantic are imported:
the second start costs the interpreter's start-up and this module, not the CLI's imports twice.
"""

from __future__ import annotations


def run() -> None:
    from kdtool import allocator

    allocator.reexec_without_tcache()
    from kdtool.cli import run as cli_run

    cli_run()
