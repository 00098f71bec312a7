"""Every fedmoe-* command (or ``python -m fedmoe_app.tools.*``) in the README and docs/ parses.

The commands are taken from the Markdown code blocks (``\\``-continued lines joined, shell
variables replaced by a word); each is parsed by the parser of the console script it names
(``[project.scripts]`` in pyproject.toml), so a renamed or removed flag in a tool fails here.
"""

import re
import shlex
import tomllib

import pytest
from conftest import ROOT, shell_blocks

from fedmoe_app.tools import export, launch, layers, partition, plan, pretrain_llm, routing
from fedmoe_app.tools.bench import cli as bench_cli
from fedmoe_app.tools.experiments import cli as experiments_cli

PARSERS = {
    "fedmoe-launch": launch.build_parser,
    "fedmoe-experiments": experiments_cli.build_parser,
    "fedmoe-bench": bench_cli.build_parser,
    "fedmoe-layers": layers.build_parser,
    "fedmoe-routing": routing.build_parser,
    "fedmoe-partition": partition.build_parser,
    "fedmoe-export": export.build_parser,
    "fedmoe-plan": plan.build_parser,
    "fedmoe-pretrain-llm": pretrain_llm.build_parser,
}
# `python -m <module>` runs the same tool as the console script
MODULES = {
    "fedmoe_app.tools.launch": "fedmoe-launch",
    "fedmoe_app.tools.experiments": "fedmoe-experiments",
    "fedmoe_app.tools.bench": "fedmoe-bench",
    "fedmoe_app.tools.layers": "fedmoe-layers",
    "fedmoe_app.tools.routing": "fedmoe-routing",
    "fedmoe_app.tools.partition": "fedmoe-partition",
    "fedmoe_app.tools.export": "fedmoe-export",
    "fedmoe_app.tools.plan": "fedmoe-plan",
    "fedmoe_app.tools.pretrain_llm": "fedmoe-pretrain-llm",
}
PYTHON = re.compile(r"^(\S*/)?python3?$")


def documented_commands():
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in shell_blocks(path.read_text()):
            for line in re.sub(r"\\\n\s*", " ", block).splitlines():
                line = re.sub(r"\$\{?\w+\}?", "x", line.split(" #", 1)[0].strip())
                lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
                lexer.whitespace_split = True
                command: list[str] = []
                for token in [*lexer, ";"]:
                    if set(token) <= set("&;|<>()"):  # a shell operator ends a command
                        if command and command[0] == "nohup":
                            command = command[1:]
                        if len(command) > 2 and PYTHON.match(command[0]) and command[1] == "-m":
                            command = [MODULES.get(command[2], command[2]), *command[3:]]
                        if command and command[0] in PARSERS:
                            found.append((path.name, command))
                        command = []
                    elif not (command and command[-1] in (">", ">>")):
                        command.append(token)
    return found


COMMANDS = documented_commands()


def test_console_scripts_are_the_documented_tools():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == set(PARSERS)
    assert {tool for _, (tool, *_) in COMMANDS} >= {"fedmoe-launch", "fedmoe-experiments", "fedmoe-bench"}


@pytest.mark.parametrize("doc, tokens", COMMANDS, ids=[f"{d}:{' '.join(t)[:60]}" for d, t in COMMANDS])
def test_documented_command_parses(doc, tokens):
    PARSERS[tokens[0]]().parse_args(tokens[1:])  # SystemExit (exit code 2) on a bad flag
