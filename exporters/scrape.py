"""The final scrape of a run: every /metrics endpoint of the stack saved as ``<out_dir>/<name>.prom``.

Endpoints come from the stack (``Stack.endpoints``: exporter, Flower) and from ``<run_dir>/ports/*.json``, where each
process that picks its own port registers it (workers, the API, the load generator). The load generator is this
process: it is written from its registry directly instead of over HTTP.
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.request
from pathlib import Path

log = logging.getLogger("loadlab.metrics")

SCRAPE_TIMEOUT_S = 10.0


def endpoints(run_dir: Path, stack=None) -> dict[str, str]:
    """name -> /metrics URL of every endpoint known for this run."""
    found: dict[str, str] = dict(getattr(stack, "endpoints", None) or {})
    for path in sorted((Path(run_dir) / "ports").glob("*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if entry.get("pid") == os.getpid():
            continue  # this process: written from its registry below
        found.setdefault(entry.get("name") or path.stem, entry["url"])
    return found


def scrape(url: str, timeout: float = SCRAPE_TIMEOUT_S) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.read()


def scrape_all(stack, out_dir: Path, *, include_self: bool = True) -> dict[str, str]:
    """Scrape every endpoint now into ``out_dir``; returns name -> file path (relative to the run directory when
    ``out_dir`` is inside it). One endpoint that does not answer is logged and skipped, never fatal."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    run_dir = Path(stack.run_dir)
    saved: dict[str, str] = {}

    def record(name: str, body: bytes) -> None:
        path = out_dir / f"{_file_name(name)}.prom"
        path.write_bytes(body)
        saved[name] = str(path.relative_to(run_dir)) if path.is_relative_to(run_dir) else str(path)

    for name, url in endpoints(run_dir, stack).items():
        started = time.monotonic()
        try:
            record(name, scrape(url))
        except Exception as exc:  # noqa: BLE001 - one dead endpoint must not lose the others
            log.warning("could not scrape %s (%s): %s", name, url, exc)
            continue
        log.debug("scraped %s in %.3fs", name, time.monotonic() - started)
    if include_self:
        from prometheus_client import REGISTRY, generate_latest

        from loadlab.exporters.loadgen_metrics import is_serving

        if is_serving():
            record("loadgen", generate_latest(REGISTRY))
    return saved


def _file_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_.@" else "_" for c in name)
