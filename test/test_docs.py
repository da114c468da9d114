"""Every command shown in README.md and docs/*.md is checked here, so a documented command that breaks
fails ``make test``.

Each ``bash`` block is split into commands, and each command into its program and arguments:
- ``make TARGET VAR=...``: the target exists; ``*_ARGS`` values parse with the program they go to;
- ``python script.py ...`` / ``python -m module ...`` / ``torchrun ... script.py ...``: the arguments parse
  with the program's own argparse parser (run in this process up to its ``parse_args``, nothing more);
  ``--ros-args -p name:=value`` names a parameter the node declares;
- ``ros2 launch openvla_ros FILE name:=value``: the launch file declares every argument;
- ``ros2 run``, ``ros2 topic pub``, ``ros2 service call``: the executable exists, the message or service
  type imports and has the fields given, and the node offers the service;
- set-up lines (``cd``, ``git clone``, ``pip install -r``, ``colcon build``, ``source``, ``hf download``):
  the files and package they name exist.
A command of any other kind fails the test until this file learns to check it. The ``python`` blocks run
with the tiny checkpoint in place of the hub model. test_ros2_cli.py, test_predict_cli.py and test_demo.py
run the README's ROS lines, the one-shot ``predict`` and ``make demo`` end to end.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import io
import re
import runpy
import shlex
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = (REPO / "README.md", *sorted((REPO / "docs").glob("*.md")))
PYTHONS = {"python", ".venv/bin/python", "python3"}
SETUP_PROGRAMS = {"cd", "git", "pip", "colcon", "source", "hf"}
SEPARATORS = {"&&", "&", ";", "||"}
MAKE_ARGS = {"PIPELINE_ARGS": "openvla_ros.pipeline", "DEMO_ARGS": "openvla_ros.demo",
             "PRETRAIN_ARGS": "openvla_ros.tiny"}


@dataclass(frozen=True)
class Command:
    """One documented command: where it is written and its words."""

    where: str
    words: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.where}: {shlex.join(self.words)}"


def fenced_blocks(path: Path, language: str) -> Iterator[tuple[int, str]]:
    """Yields (first line number, text) of each fenced block of ``language`` in a Markdown file."""
    lines = path.read_text().splitlines()
    inside, start, body = False, 0, []
    for number, line in enumerate(lines, 1):
        if not inside and line.strip() == f"```{language}":
            inside, start, body = True, number + 1, []
        elif inside and line.strip() == "```":
            inside = False
            yield start, "\n".join(body)
        elif inside:
            body.append(line)


def optional_words(words: list[str]) -> list[str]:
    """Spells out the documentation's shorthand: ``[--film]`` is the option, ``a|b`` its first choice."""
    out = []
    for word in words:
        word = word.strip("[]")
        if not word or word == "...":
            continue
        if "|" in word and not word.startswith(("'", '"')):
            word = word.split("|")[0]
        out.append(word)
    return out


def documented_commands() -> list[Command]:
    """Every command in every ``bash`` block of README.md and docs/*.md."""
    commands = []
    for path in DOCUMENTS:
        for start, text in fenced_blocks(path, "bash"):
            joined = re.sub(r"\\\n", " ", text)
            for offset, line in enumerate(joined.splitlines()):
                words = shlex.split(line, comments=True)
                current: list[str] = []
                for word in [*words, ";"]:
                    if word in SEPARATORS:
                        if current:
                            commands.append(Command(f"{path.relative_to(REPO)}:{start + offset}",
                                                    tuple(optional_words(current))))
                        current = []
                    else:
                        current.append(word)
    return commands


COMMANDS = documented_commands()


class ParsedSignal(Exception):  # noqa: N818 (a signal, not an error)
    """Raised in place of running a program once its arguments have parsed."""

    def __init__(self, namespace: argparse.Namespace) -> None:
        super().__init__("parsed")
        self.namespace = namespace


def parse_program_arguments(target: str, arguments: list[str], module: bool) -> argparse.Namespace:
    """Runs a program in this process until its ``parse_args`` returns, and returns what it parsed.

    Raises AssertionError with argparse's message when the arguments do not parse.
    """
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self: argparse.ArgumentParser, args: list[str] | None = None,
                        namespace: argparse.Namespace | None = None) -> argparse.Namespace:
        raise ParsedSignal(original(self, args, namespace))

    argv, stderr = sys.argv, io.StringIO()
    sys.argv = [target, *arguments]
    argparse.ArgumentParser.parse_args = parse_then_stop  # type: ignore[method-assign]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(stderr):
            warnings.simplefilter("ignore", RuntimeWarning)  # runpy: "found in sys.modules"
            if module:
                runpy.run_module(target, run_name="__main__", alter_sys=False)
            else:
                runpy.run_path(str(REPO / target), run_name="__main__")
    except ParsedSignal as parsed:
        return parsed.namespace
    except SystemExit as exit_:
        message = f"{target} {shlex.join(arguments)}: exit {exit_.code}: {stderr.getvalue().strip()}"
        raise AssertionError(message) from None
    finally:
        argparse.ArgumentParser.parse_args = original  # type: ignore[method-assign]
        sys.argv = argv
    raise AssertionError(f"{target} returned without parsing its arguments")


def ros_arguments(words: list[str]) -> tuple[list[str], dict[str, str], list[str]]:
    """Splits ``... --ros-args -p a:=1 --params-file F -r x:=y`` into (before, parameters, parameter files)."""
    if "--ros-args" not in words:
        return words, {}, []
    index = words.index("--ros-args")
    before, ros = words[:index], words[index + 1:]
    parameters, files = {}, []
    for flag, value in zip(ros[::2], ros[1::2], strict=True):
        assert flag in ("-p", "-r", "--params-file"), f"unknown ROS argument {flag}"
        if flag == "-p":
            name, _, parameter_value = value.partition(":=")
            parameters[name] = parameter_value
        elif flag == "--params-file":
            files.append(value)
    return before, parameters, files


def declared_node_parameters(module: str) -> set[str]:
    """The parameter names the node of ``module`` declares."""
    if module.endswith("sim_scene_node"):
        from openvla_ros.ros.sim_scene_node import PARAMETERS
    else:
        from openvla_ros.ros.parameters import PARAMETERS
    return {spec.name for spec in PARAMETERS}


def check_node_parameters(node_module: str, parameters: dict[str, str], files: list[str]) -> None:
    declared = declared_node_parameters(node_module)
    unknown = set(parameters) - declared
    assert not unknown, f"{node_module} declares no parameter {sorted(unknown)}"
    for file in files:
        assert (REPO / file).is_file(), f"parameter file {file} does not exist"


def check_python(words: list[str]) -> None:
    """``python -m module ...`` or ``python script.py ...``: the arguments parse with its own parser."""
    words, parameters, files = ros_arguments(words)
    if words[0] == "-m":
        module, arguments = words[1], words[2:]
        importlib.util.find_spec(module) or pytest.fail(f"no module {module}")
        if module.endswith(("sim_scene_node", "policy_node")):
            assert not arguments, f"{module} takes only --ros-args, not {arguments}"
            check_node_parameters(module, parameters, files)
            return
        parse_program_arguments(module, arguments, module=True)
    else:
        script, arguments = words[0], words[1:]
        assert (REPO / script).is_file(), f"no script {script}"
        parse_program_arguments(script, arguments, module=False)


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([a-z][a-z0-9-]*):", (REPO / "Makefile").read_text(), re.M))


def check_make(words: list[str]) -> None:
    targets = [word for word in words if "=" not in word]
    assert targets and set(targets) <= makefile_targets(), f"Makefile has no target {targets}"
    for assignment in (word for word in words if "=" in word):
        name, _, value = assignment.partition("=")
        makefile = (REPO / "Makefile").read_text()
        assert f"$({name})" in makefile, f"the Makefile does not use {name}"
        if name in MAKE_ARGS:
            module = MAKE_ARGS[name]
            prefix = ["artifacts/tiny-pretrained", "--pretrain"] if module == "openvla_ros.tiny" else []
            parse_program_arguments(module, prefix + shlex.split(value), module=True)


def launch_arguments(launch_file: Path) -> set[str]:
    """The argument names a launch file declares (its LAUNCH_ARGUMENTS table, read without importing it)."""
    for node in ast.parse(launch_file.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "LAUNCH_ARGUMENTS" for t in node.targets):
            return {entry[0] for entry in ast.literal_eval(node.value)}
    raise AssertionError(f"{launch_file} has no LAUNCH_ARGUMENTS table")


def message_class(type_name: str) -> type:
    package, kind, name = type_name.split("/")
    return getattr(importlib.import_module(f"{package}.{kind}"), name)


def check_fields(message: type, text: str) -> None:
    values = yaml.safe_load(text) if text else {}
    fields = set(message.get_fields_and_field_types())
    assert set(values) <= fields, f"{message.__name__} has no field {sorted(set(values) - fields)}"
    message(**values)


def offered_services() -> dict[str, set[str]]:
    """Node name -> the ``~/name`` services its source creates."""
    sources = {"openvla_policy": "openvla_ros/ros/policy_node.py", "sim_scene": "openvla_ros/ros/sim_scene_node.py"}
    return {node: set(re.findall(r'create_service\(\s*\w+,\s*"~/(\w+)"', (REPO / path).read_text()))
            for node, path in sources.items()}


def console_scripts() -> set[str]:
    return set(re.findall(r'"(\w+) = openvla_ros', (REPO / "setup.py").read_text()))


def check_ros2(words: list[str]) -> None:
    verb = words[0]
    if verb == "launch":
        package, launch_file, *arguments = words[1:]
        assert package == "openvla_ros"
        declared = launch_arguments(REPO / "launch" / launch_file)
        names = {argument.split(":=")[0] for argument in arguments}
        assert names <= declared, f"{launch_file} declares no argument {sorted(names - declared)}"
    elif verb == "run":
        words, parameters, files = ros_arguments(words)
        package, executable = words[1:3]
        assert package == "openvla_ros" and executable in console_scripts(), f"no executable {executable}"
        node_module = "sim_scene_node" if executable == "sim_scene" else "policy_node"
        check_node_parameters(node_module, parameters, files)
    elif verb == "topic":
        assert words[1] == "pub"
        positional = [word for word in words[2:] if not word.startswith("--") and not word.isdigit()]
        topic, type_name, text = positional
        check_fields(message_class(type_name), text)
    elif verb == "service":
        assert words[1] == "call"
        name, type_name, text = [*words[2:5], ""][:3]
        node, _, service = name.strip("/").partition("/")
        assert service in offered_services().get(node, set()), f"{node} offers no service {service}"
        check_fields(message_class(type_name).Request, text)
    else:
        raise AssertionError(f"ros2 {verb} is not checked")


def check_setup(words: list[str]) -> None:
    program = words[0]
    if program == "pip":
        assert words[1] == "install" and words[2] == "-r"
        assert (REPO / Path(words[3]).name).is_file(), f"no requirements file {words[3]}"
    elif program == "colcon":
        package = words[words.index("--packages-select") + 1]
        assert f"<name>{package}</name>" in (REPO / "package.xml").read_text()
    elif program == "git":
        assert words[1] == "clone"
    elif program == "hf":
        assert words[1] == "download"


def check_command(command: Command) -> None:
    words = list(command.words)
    program = words[0]
    if program in PYTHONS:
        check_python(words[1:])
    elif program == "torchrun":
        script_index = next(i for i, word in enumerate(words) if word.endswith(".py"))
        check_python(words[script_index:])
    elif program == "make":
        check_make(words[1:])
    elif program == "ros2":
        check_ros2(words[1:])
    elif program in SETUP_PROGRAMS:
        check_setup(words)
    else:
        raise AssertionError(f"a documented command of an unchecked kind: {program}")


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_documented_command_is_valid(command: Command) -> None:
    check_command(command)


def test_every_page_is_found_and_has_commands() -> None:
    """The collection above sees every page and the commands a user starts from."""
    where = {command.where.split(":")[0] for command in COMMANDS}
    assert {"README.md", "docs/node.md", "docs/recording.md", "docs/finetuning.md", "docs/simulation.md",
            "docs/performance.md"} <= where
    first_words = {command.words[:2] for command in COMMANDS}
    assert ("make", "demo") in first_words and ("make", "test") in first_words


@pytest.mark.parametrize("words", [
    ("training/finetune.py", "--vla-path", "x", "--no-such-option", "1"),
    ("-m", "openvla_ros.predict", "--model", "x", "--quantization", "3bit"),
])
def test_a_broken_command_fails_the_check(words: tuple[str, ...]) -> None:
    """The check is not a formality: an unknown option or a bad choice is caught."""
    with pytest.raises(AssertionError):
        check_python(list(words))


def test_a_launch_argument_that_does_not_exist_fails_the_check() -> None:
    with pytest.raises(AssertionError, match="no_such_argument"):
        check_ros2(["launch", "openvla_ros", "policy.launch.py", "no_such_argument:=1"])


def test_a_node_parameter_that_does_not_exist_fails_the_check() -> None:
    with pytest.raises(AssertionError, match="no_such_parameter"):
        check_ros2(["run", "openvla_ros", "policy_node", "--ros-args", "-p", "no_such_parameter:=1"])


def test_node_parameter_table_lists_every_parameter_with_its_default() -> None:
    """docs/node.md's table names every parameter the node declares, with the default it declares."""
    from openvla_ros.ros.parameters import PARAMETERS

    text = (REPO / "docs/node.md").read_text()
    table = text[text.index("## Parameters"):text.index("## MoveIt Servo")]
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    for spec in PARAMETERS:
        row = next((row for row in rows if f"`{spec.name}`" in row.split("|")[1]), None)
        assert row is not None, f"docs/node.md has no row for {spec.name}"
        names = [name.strip(" `") for name in row.split("|")[1].split("/")]
        defaults = [value.strip(" `") for value in row.split("|")[2].split(" / ")]
        default = defaults[names.index(spec.name)] if len(defaults) == len(names) else defaults[0]
        shown = ("true" if spec.default else "false") if isinstance(spec.default, bool) else spec.default
        if isinstance(shown, list):
            shown = "[]"
        if isinstance(spec.default, float):
            assert float(default) == spec.default, f"{spec.name}: docs say {default}, the node {spec.default}"
        else:
            assert default == ('""' if shown == "" else str(shown)), f"{spec.name}: docs say {default}, node {shown}"


def test_python_blocks_run(tiny_checkpoint: Path) -> None:
    """Each ``python`` block runs, with the tiny checkpoint in place of the hub model and its statistics key."""
    blocks = [(path, start, text) for path in DOCUMENTS for start, text in fenced_blocks(path, "python")]
    assert blocks, "no python block found"
    for path, start, text in blocks:
        code = text.replace('"openvla/openvla-7b"', repr(str(tiny_checkpoint))).replace('"bridge_orig"', '"tiny_demo"')
        namespace: dict = {}
        with served(tiny_checkpoint, code) as code:
            exec(compile(code, f"{path.name}:{start}", "exec"), namespace)  # noqa: S102
        if "action" in namespace:
            action = namespace["action"]
            assert action.shape == (7,) and all(map(lambda v: v == v, action)), action


@contextlib.contextmanager
def served(checkpoint: Path, code: str) -> Iterator[str]:
    """A block that talks to a policy server at http://127.0.0.1:8000 runs against a real one on the tiny model
    (at the port it got); the json_numpy patch such a client applies is undone afterwards."""
    if "http://127.0.0.1:8000" not in code:
        yield code
        return
    import json

    from serve_helpers import Server

    server = Server(checkpoint)
    saved = (json.dumps, json.loads, json.dump, json.load)
    try:
        yield code.replace("http://127.0.0.1:8000", server.url)
    finally:
        json.dumps, json.loads, json.dump, json.load = saved
        assert server.stop() == 0


def heading_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve() -> None:
    """Every relative link in README.md and docs/ names a file that exists and, with ``#``, one of its headings."""
    checked = 0
    for path in DOCUMENTS:
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            linked = (path.parent / file).resolve() if file else path
            assert linked.exists(), f"{path.relative_to(REPO)} links to {target}: no such file"
            if anchor:
                headings = re.findall(r"^#+ (.+)$", linked.read_text(), re.M)
                assert anchor in {heading_anchor(h) for h in headings}, f"{path.relative_to(REPO)}: no heading #{anchor}"
            checked += 1
    assert checked >= 20
