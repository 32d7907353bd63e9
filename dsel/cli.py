"""The `dsel` command line: one subcommand per stage, each configured by a typed dataclass.

Every command takes `-c/--config FILE.yaml` and any number of `key=value` overrides:

    dsel tokenize input=corpus.jsonl out=data/corpus vocab_size=8000
    dsel pds solve -c configs/pds.yaml solver.steps=50

Global options (`--log-level`) are accepted before or after the command; `--print-config` prints
the resolved settings as YAML and exits without running.

A stage module declares its commands in a module-level list `COMMANDS` of `Command`s; listing
the module in `COMMAND_MODULES` below puts them on the command line. Heavy imports (torch,
megatron) belong inside the `run` functions so `dsel --help` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import yaml

from dsel.config import describe, load_config, to_dict
from dsel.errors import DselError

# Modules that declare `COMMANDS`; each stage adds its own line.
COMMAND_MODULES: list[str] = [
    "dsel.color.commands",
    "dsel.pds.commands",
    "dsel.data.commands",
    "dsel.score.commands",
    "dsel.select.commands",
    "dsel.train.commands",
    "dsel.eval.commands",
    "dsel.pipeline.commands",
    "dsel.models.commands",
]

# A one-word command that is also a group ("score" next to "score merge") is the group's `run`.
DEFAULT_SUBCOMMAND = "run"


@dataclass(frozen=True)
class Command:
    """A CLI command: `name` may have two words ("pds solve") for a command group."""

    name: str
    help: str
    config: type
    run: Callable[[Any], Any]


def all_commands() -> list[Command]:
    """Every command of every registered stage module, in registration order."""
    return [cmd for mod in COMMAND_MODULES for cmd in importlib.import_module(mod).COMMANDS]


def build_parser(commands: list[Command]) -> argparse.ArgumentParser:
    """An argparse parser with a subparser per command (and per group for two-word names)."""
    parser = argparse.ArgumentParser(
        prog="dsel",
        description="Select pretraining data with PDS or CoLoR-Filter, pretrain on it and evaluate.",
    )
    add_global_options(parser, os.environ.get("DSEL_LOG_LEVEL", "INFO"))
    top = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for cmd in commands:
        words = cmd.name.split()
        if len(words) == 1 and words[0] in group_names(commands):
            words.append(DEFAULT_SUBCOMMAND)
        target = top
        if len(words) == 2:
            if words[0] not in groups:
                group = top.add_parser(words[0], help=f"{words[0]} commands")
                groups[words[0]] = group.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
            target = groups[words[0]]
        sub = target.add_parser(
            words[-1],
            help=cmd.help,
            description=cmd.help + "\n\nsettings (set in the YAML file or as key=value):\n" + "\n".join(describe(cmd.config)),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.add_argument("-c", "--config", help="YAML file of settings")
        sub.add_argument("--print-config", action="store_true", help="print the resolved settings as YAML and exit")
        add_global_options(sub, argparse.SUPPRESS)  # also after the command; the top-level value is the default
        sub.add_argument("overrides", nargs="*", metavar="key=value", help="settings that override the YAML file")
        sub.set_defaults(_command=cmd)
    return parser


def add_global_options(parser: argparse.ArgumentParser, default) -> None:
    """Options every command takes, before or after its name."""
    parser.add_argument("--log-level", default=default, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], help="logging level (default INFO)")


def group_names(commands: list[Command]) -> set[str]:
    """First words of the two-word commands."""
    return {cmd.name.split()[0] for cmd in commands if " " in cmd.name}


def with_default_subcommand(argv: list[str], commands: list[Command]) -> list[str]:
    """`dsel score k=v` -> `dsel score run k=v` when "score" is both a command and a group."""
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        i += 2 if argv[i] == "--log-level" else 1
    if i >= len(argv) or argv[i] not in group_names(commands) or argv[i] not in {c.name for c in commands}:
        return argv
    subcommands = {c.name.split()[1] for c in commands if c.name.startswith(argv[i] + " ")}
    following = argv[i + 1] if i + 1 < len(argv) else None
    if following in subcommands or following in ("-h", "--help", DEFAULT_SUBCOMMAND):
        return argv
    return argv[: i + 1] + [DEFAULT_SUBCOMMAND] + argv[i + 1 :]


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `dsel` command: parse, load the config, run; bad input exits with 2."""
    commands = all_commands()
    parser = build_parser(commands)
    args = parser.parse_args(with_default_subcommand(sys.argv[1:] if argv is None else list(argv), commands))
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    cmd: Command = args._command
    try:
        config = load_config(cmd.config, args.config, args.overrides)
        if args.print_config:
            print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
            return
        cmd.run(config)
    except DselError as e:
        print(f"dsel {cmd.name}: error: {e}", file=sys.stderr)
        sys.exit(2)
