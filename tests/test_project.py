"""The repository's own wiring: the CI command, the README and the data-file lookup agree."""
import re
import shlex
from pathlib import Path

from gsa_kernels._paths import tuned_configs_dir

ROOT = Path(__file__).resolve().parent.parent


def test_readme_shows_the_ci_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    match = re.search(r"^TEST_CMD=\((.*)\)$", ci, re.MULTILINE)
    assert match, ".ci/run must define TEST_CMD=(...)"
    command = " ".join(shlex.split(match.group(1)))
    readme_lines = [line.strip() for line in (ROOT / "README.md").read_text().splitlines()]
    assert command in readme_lines, f"README.md must show the test command {command!r} on a line of its own"


def test_tuned_configs_dir_is_the_repository_folder_in_a_checkout():
    folder = tuned_configs_dir()
    assert folder.is_dir(), f"{folder} does not exist"
    assert folder.name == "tuned_configs"
