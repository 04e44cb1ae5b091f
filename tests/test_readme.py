"""The README documents every option, scenario and command a user can give (it is the manual)."""
from loadtests.scenarios import SCENARIOS
from stack import cli_docs
from stack.cli import main
from tests.conftest import REPO

README = (REPO / "README.md").read_text()


def test_the_option_reference_is_current():
    assert cli_docs.render() in README, "README's option reference is stale: paste `python -m stack.cli_docs` in"


def test_every_command_is_described():
    names = [name for name, _ in cli_docs._commands(main, "loadlab")]
    table = "\n".join(line for line in README.splitlines() if line.startswith("| `loadlab"))
    missing = [name for name in names if f"`{name}" not in table and f"/ `{name.rsplit(' ', 1)[-1]}`" not in table]
    assert not missing, f"README does not describe: {missing}"


def test_every_scenario_is_documented():
    missing = [name for name in SCENARIOS if f"| `{name}` |" not in README]
    assert not missing, f"README does not document the scenarios {missing}"
