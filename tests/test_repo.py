"""Repository contracts: the README's commands, CI running exactly the README's test command, pins."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _readme_commands() -> list[str]:
    head = "\n".join((REPO / "README.md").read_text().splitlines()[:40])
    return re.findall(r"```bash\n(.+?)\n```", head)


def test_readme_opens_with_the_two_commands():
    commands = _readme_commands()
    assert len(commands) >= 2
    assert "python pipeline.py --mode train" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_exactly_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci
    assert "pip install torch==2.13.0" in _readme_commands()[1]


def test_requirements_have_lower_and_upper_bounds():
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            assert ">=" in line and "<" in line.split(">=")[1], line
    assert 'platform_system == "Linux"' in next(
        x for x in (REPO / "requirements.txt").read_text().splitlines() if x.startswith("triton")
    )
