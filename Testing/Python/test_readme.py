"""The README's test command is the one CI runs."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ci_runs_the_readme_test_command():
    ci_commands = [
        line.strip()
        for line in (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("python -m pytest")
    ]
    assert len(ci_commands) == 1
    assert ci_commands[0] in (REPO / "README.md").read_text(encoding="utf-8")
    assert "torch==2.13.0" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_the_readme_starts_with_the_main_job_and_then_the_tests():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert first_block[0].startswith("python -m pip install torch==2.13.0") and first_block[0].endswith(
        "medsegsuite demo"
    )
    assert first_block[1] == "python -m pytest Testing/Python -q"
