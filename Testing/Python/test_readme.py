"""The README tells the truth: its commands are the ones CI runs, and its command-line synopsis lists
exactly the options the parser takes."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from MedSegSuiteLib.cli import build_parser

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text(encoding="utf-8")
SHARED_OPTIONS = {"-v", "--verbose", "--debug"}  # accepted by every command, documented once on the first line


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    ci_commands = [line.strip() for line in ci.splitlines() if line.strip().startswith("python -m pytest")]
    assert len(ci_commands) == 1
    assert ci_commands[0] in README
    assert "torch==2.13.0" in ci and 'pip install --quiet ".[test]"' in ci
    assert ci.index("torch==2.13.0") < ci.index('".[test]"') < ci.index(ci_commands[0])


def _first_block() -> list[str]:
    return README.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()


def test_the_readme_starts_with_the_main_job_and_then_the_tests():
    first, second = _first_block()
    assert first.startswith("python -m pip install torch==2.13.0") and first.endswith("medsegsuite demo")
    assert "[test]" not in first, "the demo must not need the test extras (VTK, Qt, slicer-core)"
    assert second.startswith('python -m pip install ".[test]" && ')
    assert " -q" not in second, "the test command shows its progress"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert second.endswith(next(line.strip() for line in ci.splitlines() if line.startswith("python -m pytest")))


def test_the_python_versions_the_readme_states_are_the_packages():
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    minimum = re.search(r'^requires-python = ">=3\.(\d+)"', pyproject, re.M)
    assert minimum, "requires-python must be a plain lower bound"
    assert f"Python 3.{minimum.group(1)} or newer" in README
    assert int(minimum.group(1)) >= 10, "torch 2.13 needs Python 3.10 or newer"
    core = re.search(r"^dependencies = \[(.*?)^\]", pyproject, re.M | re.S).group(1)
    extras = re.search(r"^test = \[(.*?)^\]", pyproject, re.M | re.S).group(1)
    for heavy in ("slicer-core", "PySide6", "vtk"):
        assert heavy.lower() not in core.lower(), f"{heavy} belongs in the test extras, not in what the demo installs"
    assert "slicer-core" in extras and "pytest" in extras


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser) of the command line, the main parser first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def _synopsis() -> dict[tuple[str, ...], set[str]]:
    """Options named by each entry of the README's command-line synopsis, by command path.

    An entry starts with ``medsegsuite`` and runs on over indented lines; an optional action
    (``models [list]``) documents both the command with it and the one without.
    """
    block = README.split("## Command line", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    parser = build_parser()
    entries: dict[tuple[str, ...], set[str]] = {}
    keys: list[tuple[str, ...]] = []
    for line in block.splitlines():
        if line.startswith("medsegsuite"):
            keys, node, path = [], parser, ()
            for word in line.split()[1:]:
                name = word.strip("[]")
                choices = next((a.choices for a in node._actions if isinstance(a, argparse._SubParsersAction)), {})
                if name not in choices:
                    break
                if word.startswith("["):
                    keys.append(path)
                node, path = choices[name], (*path, name)
            keys.append(path)
        for key in keys:
            entries.setdefault(key, set()).update(re.findall(r"(?<![\w.-])(--?[a-z][a-z0-9-]*)", line))
    return entries


def test_every_option_of_every_command_is_in_the_readme_synopsis_and_nothing_else():
    entries = _synopsis()
    for path, parser in _parsers(build_parser()):
        command = " ".join(("medsegsuite", *path))
        assert path in entries, f"`{command}` is missing from the README's command-line synopsis"
        actions = [a for a in parser._actions if a.option_strings and "-h" not in a.option_strings]
        if path:
            actions = [a for a in actions if not SHARED_OPTIONS & set(a.option_strings)]
        documented = entries[path]
        for action in actions:
            assert documented & set(action.option_strings), (
                f"`{command} {action.option_strings[-1]}` is not in the README"
            )
        known = {s for a in parser._actions for s in a.option_strings}
        assert documented <= known, f"the README gives `{command}` options it does not take: {documented - known}"


def test_every_option_has_help_and_shows_its_default():
    for path, parser in _parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            name = f"medsegsuite {' '.join(path)} {action.option_strings[-1] if action.option_strings else action.dest}"
            assert action.help, f"{name} has no help"
            default = action.default
            if default is None or default is False or default == [] or default is argparse.SUPPRESS:
                continue
            assert "default" in formatter._get_help_string(action), f"the help of {name} does not say its default"
