"""``loadlab gate`` and ``loadlab report``: verdicts and pages from a finished run directory."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from loadlab.cli.common import UsageError, console
from loadlab.reports.report import REPORT_FILE


def load_gate_rules(gates_file: str, baseline: str | None):
    from loadlab.reports.gates import GateConfigError, load_rules

    try:
        rules = load_rules(gates_file)
    except GateConfigError as exc:
        raise UsageError(in_rules_file(exc, gates_file)) from None
    if baseline and not (Path(baseline) / REPORT_FILE).is_file():
        raise UsageError(f"--baseline {baseline!r} has no report.json; give the directory of a finished run.")
    return rules


def in_rules_file(exc: Exception, rules_file: str) -> str:
    """Errors about one rule say 'gate rule 2 …': name the file they are in too."""
    message = str(exc)
    return f"{rules_file}: {message}" if message.startswith("gate rule") else message


def gate_run(run_dir: Path, rules_file: str, baseline: str | None) -> int:
    from loadlab.reports.gates import GateConfigError, gate_run_dir
    from loadlab.reports.render import write_rendered
    from loadlab.reports.report import load_report

    try:
        code = gate_run_dir(run_dir, rules_file, baseline, console=console)
    except GateConfigError as exc:
        raise UsageError(in_rules_file(exc, rules_file)) from None
    write_rendered(run_dir, load_report(run_dir))
    return code


@click.command()
@click.argument("run_dir")
@click.option("--rules", required=True, help="Gate rules YAML")
@click.option("--baseline", default=None, help="Run directory to compare max_regression rules against")
def gate(run_dir, rules, baseline):
    """Evaluate gates on a finished run: exit 0 pass, 1 a rule failed, 2 bad rules or run directory."""
    if not (Path(run_dir) / REPORT_FILE).is_file():
        raise UsageError(f"RUN_DIR {run_dir!r} has no report.json; give the directory of a finished run.")
    sys.exit(gate_run(Path(run_dir), rules, baseline))


@click.command()
@click.argument("run_dir")
def report(run_dir):
    """Rebuild report.html and summary.md from a run directory's report.json."""
    from loadlab.reports.render import write_rendered
    from loadlab.reports.report import ReportVersionError, load_report

    path = Path(run_dir)
    if not (path / REPORT_FILE).is_file():
        raise UsageError(f"RUN_DIR {run_dir!r} has no report.json; give the directory of a finished run.")
    try:
        data = load_report(path)
    except ReportVersionError as exc:
        raise UsageError(str(exc)) from None
    except ValueError as exc:
        raise UsageError(f"{path / 'report.json'} is not valid JSON ({exc}).") from None
    write_rendered(path, data)
    console.print(f"rebuilt {path / 'report.html'} and {path / 'summary.md'}")
