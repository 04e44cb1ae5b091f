"""Minimal JUnit XML writer (the dialect GitHub Actions, GitLab and Jenkins test reporters all read).

Kept independent of the gates so any loadlab check (gates, ``dashboards check``, …) can emit test cases.
The document is ``<testsuites>`` holding one ``<testsuite>``; every reporter we care about accepts that shape,
and some reject a bare ``<testsuite>`` root.
"""
from __future__ import annotations

import os
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable


@dataclass(frozen=True)
class JUnitCase:
    """One ``<testcase>``; ``failure_message`` set means the case failed."""

    name: str
    classname: str
    time_s: float = 0.0
    failure_message: str | None = None
    failure_text: str | None = None
    system_out: str | None = None

    @property
    def failed(self) -> bool:
        return self.failure_message is not None


def junit_xml(cases: Iterable[JUnitCase], suite_name: str, timestamp: datetime | None = None) -> str:
    """Render ``cases`` as a JUnit XML document (a string with an XML declaration)."""
    cases = list(cases)
    failures = sum(1 for case in cases if case.failed)
    total_time = sum(case.time_s for case in cases)
    stamp = (timestamp or datetime.now(timezone.utc)).replace(microsecond=0).isoformat()
    counts = {"tests": str(len(cases)), "failures": str(failures), "errors": "0", "skipped": "0"}

    root = ET.Element("testsuites", {"name": suite_name, **counts, "time": _secs(total_time)})
    suite = ET.SubElement(
        root, "testsuite", {"name": suite_name, **counts, "time": _secs(total_time), "timestamp": stamp}
    )
    for case in cases:
        element = ET.SubElement(
            suite, "testcase", {"name": case.name, "classname": case.classname, "time": _secs(case.time_s)}
        )
        if case.failed:
            failure = ET.SubElement(element, "failure", {"message": case.failure_message or "", "type": "failure"})
            failure.text = case.failure_text or case.failure_message
        if case.system_out:
            ET.SubElement(element, "system-out").text = case.system_out
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: str | os.PathLike[str], cases: Iterable[JUnitCase], suite_name: str) -> Path:
    """Write the document atomically, so a CI reporter never picks up a half-written file."""
    target = Path(path)
    atomic_write_text(target, junit_xml(cases, suite_name))
    return target


def _secs(value: float) -> str:
    return f"{value:.3f}"


def atomic_write_text(target: Path, text: str) -> None:
    """Write via a temp file + rename so readers see the old file or the new one, never a torn one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        # mkstemp creates 0600 files; keep the usual permissions so artifacts stay readable to others.
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _file_mode(target: Path) -> int:
    try:
        return target.stat().st_mode & 0o777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask
