"""The README documents every option, scenario and command a user can give (it is the manual). The CLI is read in
a child interpreter, as a user's shell would load it."""
import json
import subprocess
import sys

from loadlab.loadtests.scenarios import SCENARIOS
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
COMMANDS = ("import json; from loadlab.cli import docs as cli_docs; from loadlab.cli.main import main; "
            "print(json.dumps({'reference': cli_docs.render(), "
            "'commands': [n for n, _ in cli_docs._commands(main, 'loadlab')]}))")


def _cli_facts() -> dict:
    out = subprocess.run([sys.executable, "-c", COMMANDS], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_option_reference_is_current():
    assert _cli_facts()["reference"] in README, \
        "README's option reference is stale: paste `python -m loadlab.cli.docs` in"


def test_every_command_is_described():
    table = "\n".join(line for line in README.splitlines() if line.startswith("| `loadlab"))
    missing = [name for name in _cli_facts()["commands"]
               if f"`{name}" not in table and f"/ `{name.rsplit(' ', 1)[-1]}`" not in table]
    assert not missing, f"README does not describe: {missing}"


def test_every_scenario_is_documented():
    missing = [name for name in SCENARIOS if f"| `{name}` |" not in README]
    assert not missing, f"README does not document the scenarios {missing}"
