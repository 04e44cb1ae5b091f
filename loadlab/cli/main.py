"""``loadlab``: the one command line that drives the stack, the load, the reports and the gates; the composition
root: each command group is a module of this package. User errors print one sentence and exit 2; a failed gate or
check exits 1."""
from __future__ import annotations

import click

import loadlab
from loadlab.cli import bench_commands, dashboard_commands, gate_commands, run_commands, stack_commands
from loadlab.cli.common import RUN_FIELDS, STACK_FIELDS, LoadlabGroup  # noqa: F401 - read by loadlab.cli.docs


@click.group(cls=LoadlabGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(loadlab.__version__, "--version", prog_name="loadlab", message="%(prog)s %(version)s")
def main():
    """loadlab: load-test and observe a Celery stack (producer API, broker, workers, result backend)."""


for command in (stack_commands.up, run_commands.run, run_commands.ui, gate_commands.gate, gate_commands.report,
                run_commands.sweep, run_commands.serialization, stack_commands.api, stack_commands.exporter,
                bench_commands.bench, dashboard_commands.dashboards, run_commands.scenarios, run_commands.tasks):
    main.add_command(command)


if __name__ == "__main__":
    main()
