"""Generate the committed dashboard JSON and check that it, and every query, is sound.

``build()`` writes ``dashboards/json/<uid>.json`` (what Grafana provisioning mounts); ``check()`` lists problems: JSON
missing or stale compared with a fresh build, a panel without a query, an expression promtool cannot parse, a rule file
promtool rejects. ``loadlab dashboards build|check`` call these; ``python -m loadlab.dashboards.build [build|check]`` does too
(exit 1 when check finds problems, 2 when promtool is missing).
"""
from __future__ import annotations

import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from . import grafana
from .queries import DASHBOARDS, RULES_FILE, Query, dashboard_queries, expand

JSON_DIR = Path(__file__).resolve().parent / "json"
# promtool's location prefix refers to the temporary rule file, which means nothing to the reader.
_PARSE_PREFIX = re.compile(r'^.*could not parse expression: ')


class PromtoolMissing(RuntimeError):
    """promtool is needed to parse PromQL; Debian ships it in the ``prometheus`` package."""


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise PromtoolMissing(
            "promtool not found on PATH; install it (Debian/Ubuntu: apt-get install prometheus) to check queries."
        )
    return path


def _sdk_version() -> str:
    # The SDK's output is what is compared, so a different SDK release alone can make the JSON "stale": say which.
    try:
        return importlib.metadata.version("grafana-foundation-sdk")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def render() -> dict[str, str]:
    """``{uid: JSON text}`` for every dashboard, exactly as ``build()`` writes it."""
    return {spec.uid: grafana.to_json(spec) for spec in DASHBOARDS}


def build(out_dir: Path = JSON_DIR) -> list[Path]:
    """Write every dashboard to ``out_dir/<uid>.json`` and return the paths.

    In the default directory (which holds nothing but generated dashboards) JSON files no dashboard produces any more
    are removed, so renaming a dashboard's uid does not leave a stale copy that Grafana would keep provisioning.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rendered = render()
    written: list[Path] = []
    for uid, text in rendered.items():
        path = out_dir / f"{uid}.json"
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        written.append(path)
    if out_dir.resolve() == JSON_DIR:
        for orphan in sorted(out_dir.glob("*.json")):
            if orphan.stem not in rendered:
                orphan.unlink()
    return written


def json_problems(json_dir: Path = JSON_DIR) -> list[str]:
    """Missing, stale or orphaned JSON files in ``json_dir``, and panels without a query (no promtool needed)."""
    problems: list[str] = []
    rendered = render()
    for uid, text in rendered.items():
        path = json_dir / f"{uid}.json"
        if not path.exists():
            problems.append(f"{path}: missing; run `loadlab dashboards build`")
        elif path.read_text(encoding="utf-8") != text:
            problems.append(f"{path}: stale (differs from the dashboard code built with grafana-foundation-sdk "
                            f"{_sdk_version()}); run `loadlab dashboards build`")
    for path in sorted(json_dir.glob("*.json")):
        if path.stem not in rendered:
            problems.append(f"{path}: no dashboard generates it; run `loadlab dashboards build` to remove it")
    for uid, text in rendered.items():
        for panel in json.loads(text).get("panels", []):
            if not any(str(t.get("expr", "")).strip() for t in panel.get("targets") or []):
                problems.append(f"{uid}: panel {panel.get('title')!r} has no query")
    return problems


def _expanded() -> tuple[list[Query], list[str]]:
    """Dashboard queries with Grafana variables replaced, plus a problem per unknown variable."""
    queries: list[Query] = []
    problems: list[str] = []
    for q in dashboard_queries(raw=True):
        try:
            queries.append(q._replace(expr=expand(q.expr)))
        except ValueError as exc:
            problems.append(f"{q.uid}: panel {q.title!r}: {exc}")
    return queries, problems


def parse_problems(queries: list[Query]) -> list[str]:
    """Parse each expression with ``promtool check rules``, one temporary rule file per query.

    promtool has no "parse this expression" command, but it parses every rule's ``expr`` when it checks a rule file;
    one file per query lets its per-file verdict point at the panel that is wrong.
    """
    if not queries:
        return []
    tool = promtool()
    with tempfile.TemporaryDirectory(prefix="loadlab-promql-") as tmp:
        files: dict[str, Query] = {}
        for i, q in enumerate(queries):
            path = Path(tmp) / f"q{i:04d}.yml"
            doc = {"groups": [{"name": "parse", "rules": [{"alert": "Parse", "expr": q.expr}]}]}
            path.write_text(yaml.safe_dump(doc), encoding="utf-8")
            files[str(path)] = q
        proc = subprocess.run([tool, "check", "rules", *files], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            return []
        problems: list[str] = []
        output = proc.stdout + proc.stderr
        for name, q in files.items():
            errors = [
                _PARSE_PREFIX.sub("", line.split(f"{name}:", 1)[1].strip())
                for line in output.splitlines() if f"{name}:" in line
            ]
            if errors:
                problems.append(f"{q.uid}: {q.title!r}: {q.expr!r} does not parse: {'; '.join(errors)}")
        if not problems:  # promtool failed without naming a file: report it verbatim rather than passing
            problems.append(f"promtool check rules failed: {output.strip()}")
        return problems


def rules_problems(rules_file: Path = RULES_FILE) -> list[str]:
    """The committed rule file as Prometheus will load it: syntax, templates, durations, duplicate rules."""
    proc = subprocess.run([promtool(), "check", "rules", str(rules_file)], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0:
        return []
    return [f"{rules_file}: promtool check rules failed: {(proc.stdout + proc.stderr).strip()}"]


def check(json_dir: Path = JSON_DIR) -> list[str]:
    """Every problem found, as one line each; an empty list means the dashboards and rules are sound.

    Raises ``PromtoolMissing`` when promtool is not installed (a check that cannot parse queries must not pass).
    """
    promtool()  # fail fast, before any work, when the check cannot be complete
    problems = json_problems(Path(json_dir))
    queries, variable_problems = _expanded()
    problems += variable_problems
    problems += rules_problems()
    # Alert expressions are parsed as part of the rule file above; the dashboards' expressions here.
    problems += parse_problems(queries)
    return problems


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "check"
    if command == "build" and len(args) == 1:
        for path in build():
            print(path)
        return 0
    if command == "check" and len(args) == 1:
        try:
            problems = check()
        except PromtoolMissing as exc:
            print(exc, file=sys.stderr)
            return 2
        for problem in problems:
            print(problem, file=sys.stderr)
        if not problems:
            print(f"{len(DASHBOARDS)} dashboards up to date; all queries parse")
        return 1 if problems else 0
    print("usage: python -m loadlab.dashboards.build [build|check]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
