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

from fedmoe_app.tools import export, launch, layers, partition, plan, pretrain, pretrain_llm, routing
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
    "fedmoe-pretrain": pretrain.build_parser,
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
    "fedmoe_app.tools.pretrain": "fedmoe-pretrain",
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


def documented_run_configs():
    """Every ``--run-config "..."`` (and ``--node-config``) in a shell block of the README and docs/."""
    found = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in shell_blocks(path.read_text()):
            block = re.sub(r"\\\n\s*", " ", block)  # continued lines joined
            for flag, value in re.findall(r'--(run-config|node-config) "([^"]+)"', block):
                found.append((path.name, flag, value))
    return found


RUN_CONFIGS = documented_run_configs()


def test_the_readme_shows_data_model_and_serverapp_commands():
    readme = [(flag, value) for doc, flag, value in RUN_CONFIGS if doc == "README.md"]
    values = " ".join(v for _, v in readme)
    for needed in ("dataset='images'", "central-eval=false", "model='mlp_moe:build'", "dataset-path="):
        assert needed in values, needed
    assert any(tool == "fedmoe-launch" and "examples/own_serverapp" in t for _, (tool, *t) in COMMANDS)


@pytest.mark.parametrize(
    "doc, flag, value", RUN_CONFIGS, ids=[f"{d}:{f}:{v[:50]}" for d, f, v in RUN_CONFIGS]
)
def test_documented_run_config_parses_and_validates(doc, flag, value):
    """Flower's parser reads it; a run config also passes the app's start-up checks.

    Only a file the command names that this machine lacks (a user's model folder) may fail.
    """
    from flwr.common.config import parse_config_args

    from fedmoe_app.config import ConfigError, RunConfig

    parsed = parse_config_args([re.sub(r"\$\{?\w+\}?", "x", value)])
    if flag == "run-config" and not re.search(r"='\$\{?\w+\}?'", value):  # no value set by a loop
        try:
            RunConfig.from_run_config(parsed)
        except ConfigError as err:
            if not re.search(
                r"'(hf-model|hf-weights|hf-config)' = '[^']*x/.*(not a folder|no such file)", str(err)
            ):
                raise
