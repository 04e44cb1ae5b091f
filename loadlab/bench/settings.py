"""The settings of each benchmark, defined once: the CLI makes its options from these fields and the measuring
processes (``python -m loadlab.bench.…``) take their defaults from them."""
from __future__ import annotations

from pydantic import BaseModel, Field


class PublishBench(BaseModel):
    rounds: int = Field(12, ge=1, description="Rounds of each side once (A B, then B A)")
    seconds: float = Field(1.0, ge=0.2, description="Seconds per side and round")


class RecorderBench(BaseModel):
    sizes: str = Field("100000,1000000", description="Task counts, each in a fresh process")


class OverheadBench(BaseModel):
    rounds: int = Field(20, ge=1, description="Rounds of a burst and a paced phase per stack, the order rotated each round")
    tasks: int = Field(1000, ge=100, description="No-op tasks in each burst (throughput)")
    paced_tasks: int = Field(40, ge=10, description="Tasks of each paced phase (p50)")
    paced_rate: float = Field(40.0, ge=1, description="Tasks/s of the paced phase")
    workers: int = Field(1, ge=1, description="Worker processes per stack")
    concurrency: int = Field(2, ge=1, description="Prefork pool size")
    warmup: int = Field(200, ge=0, description="No-op tasks each stack runs before it is measured")
    instruction_tasks: int = Field(60, ge=5, description="With --instructions: no-op tasks counted per stack under callgrind")
    instruction_payload_bytes: int = Field(0, ge=0, le=1024 * 1024, description="With --instructions: each task is the payload task carrying and returning a nested_dicts body of this many JSON bytes (work a real task mix does per task: encoding, decoding, the result stored) instead of a no-op (0)")


class ExporterBench(BaseModel):
    events: int = Field(50_000, ge=1000, description="Events in the stream")
    rounds: int = Field(3, ge=1, description="Alternating rounds")
    seed: int = Field(7, description="Seed of the generated stream")
    e2e_broker: str | None = Field(None, description="AMQP broker for the end-to-end figure: each exporter process drains the stream from its own queue there (unset: skipped)")
    e2e_events: int = Field(20_000, ge=0, description="Events published to a real broker for the end-to-end figure (0: none)")


class MetricStoreBench(BaseModel):
    tasks: int = Field(100_000, ge=1000, description="Tasks recorded per side and round")
    rounds: int = Field(7, ge=1, description="Interleaved rounds")
