"""Check Flower command lines against the installed CLIs' ``--help``.

Deployment files (compose files, Dockerfiles, scripts) spell out ``flower-superlink``,
``flower-supernode``, ``flower-superexec`` and ``flwr`` flags by hand, and Flower renames
or removes flags between releases (``--fleet-api-address`` became ``--port``,
``--plugin-type`` disappeared). :func:`check_argv` reports every flag of a command line
that the installed command does not list in its ``--help``, and every value outside an
argparse ``{a,b}`` choice set.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Sequence
from functools import lru_cache

_FLAG = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")
_CHOICE = re.compile(r"(--[a-z0-9][a-z0-9-]*)\s+\{([^}]*)\}")
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


@lru_cache(maxsize=32)
def help_text(command: tuple[str, ...]) -> str:
    """Return ``command --help`` output (plain text, wide, no colours).

    Parameters
    ----------
    command : tuple[str, ...]
        The program and optional sub-commands, e.g. ``("flwr", "supernode", "register")``.

    Returns
    -------
    str
        What the command printed.

    Raises
    ------
    RuntimeError
        When the command is missing or its ``--help`` fails.

    """
    env = dict(os.environ, COLUMNS="250", NO_COLOR="1", TERM="dumb", FLWR_DISABLE_UPDATE_CHECK="1")
    try:
        proc = subprocess.run(
            [*command, "--help"],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(f"cannot run `{' '.join(command)} --help`: {exc}") from exc
    if proc.returncode != 0:
        raise RuntimeError(f"`{' '.join(command)} --help` exited {proc.returncode}: {proc.stderr[-500:]}")
    return _ANSI.sub("", proc.stdout + proc.stderr)


def known_flags(command: Sequence[str]) -> set[str]:
    """Return every ``--flag`` that ``command --help`` mentions."""
    return set(_FLAG.findall(help_text(tuple(command))))


def choices(command: Sequence[str]) -> dict[str, set[str]]:
    """Return the flags whose values are limited to a set, from argparse usage (``--isolation {a,b}``)."""
    return {
        flag: {v.strip() for v in values.split(",")}
        for flag, values in _CHOICE.findall(help_text(tuple(command)))
    }


def check_argv(command: Sequence[str], args: Sequence[str]) -> list[str]:
    """List the problems of ``command args`` against the installed ``command --help``.

    Parameters
    ----------
    command : Sequence[str]
        Program (and sub-commands), e.g. ``["flower-supernode"]``.
    args : Sequence[str]
        Its arguments, e.g. ``["--insecure", "--isolation", "process"]``; ``--flag=value``
        is understood.

    Returns
    -------
    list[str]
        One message per unknown flag or invalid choice; empty when all is well.

    """
    known = known_flags(command)
    limited = choices(command)
    problems = []
    name = " ".join(command)
    for i, arg in enumerate(args):
        if not arg.startswith("--"):
            continue
        flag, eq, inline = arg.partition("=")
        if flag not in known:
            problems.append(f"{name}: unknown flag {flag}")
            continue
        if flag in limited:
            value = inline if eq else (args[i + 1] if i + 1 < len(args) else "")
            if value not in limited[flag]:
                problems.append(f"{name}: {flag} {value!r} not in {sorted(limited[flag])}")
    return problems
