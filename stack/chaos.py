"""Fault injection during a run: ``--chaos kill-worker@10s,restart-broker@20s,…``. Each fault is applied to the
running stack at its time after the load started; the stack restarts what it killed and the run goes on. The report
lists each fault, what the settings used promise about it, and what was lost."""
from __future__ import annotations

import os
import platform
import signal
import time

from loadlab.config.settings import FAULTS, Fault, parse_plan  # noqa: F401 - the plan is part of the settings

# kombu's Redis transport takes a message with BRPOP and records it as unacknowledged in a second step: a message
# between the two when its worker or the broker dies is lost whatever acks_late says (at most one per consumer).
REDIS_IN_TRANSIT = ("; with a Redis broker a message in transit (popped, not yet recorded as unacknowledged) "
                    "can still be lost: at most one per worker")


def expectation(kind: str, settings) -> dict:
    """What the settings promise for a fault: ``max_lost`` is the most tasks it may lose (None: no promise)."""
    acks_late = settings.acks_late
    redis_broker = (settings.broker or "").startswith("redis")
    if kind == "kill-worker-child":
        if acks_late:
            return {"max_lost": 0, "text": "acks_late + task_reject_on_worker_lost: the task in flight is requeued "
                                           "and runs again (a duplicate is possible); nothing lost"}
        return {"max_lost": 0, "text": "without acks_late the task in flight fails with WorkerLostError "
                                       "(counted failed, not lost); prefetched tasks stay with the worker"}
    if kind == "kill-worker":
        redelivery = (f"after the visibility timeout ({settings.visibility_timeout_s}s)" if redis_broker
                      else "at once")
        if acks_late and (not redis_broker or settings.visibility_timeout_s < settings.drain_timeout_s):
            return {"max_lost": 1 if redis_broker else 0,
                    "text": f"acks_late: running and prefetched tasks were never acknowledged and come back {redelivery}"
                            ", before the drain deadline (duplicates possible)"
                            + (REDIS_IN_TRANSIT.replace("per worker", "for the killed worker") if redis_broker else "")}
        return {"max_lost": None, "text": "without acks_late (or with a visibility timeout past the drain deadline) "
                                          "the tasks it was running are lost; prefetched ones come back "
                                          f"{redelivery}"}
    if kind == "restart-broker":
        if settings.broker_persistence:
            held = settings.workers * settings.concurrency * (max(1, settings.prefetch_multiplier) + 1)
            return {"max_lost": held,
                    "text": "the embedded Redis writes an append-only file (fsync always): queued tasks survive the "
                            "restart. Tasks the workers held (running or reserved, at most workers × concurrency × "
                            f"(prefetch + 1) = {held}) can be lost: on a lost connection kombu hands reserved "
                            "messages back to the broker that has just gone away"}
        return {"max_lost": None, "text": "Redis without persistence: tasks queued in the broker (and results stored "
                                          "there) are gone after the restart"}
    if kind == "restart-api":
        return {"max_lost": 0, "text": "HTTP requests in flight fail; tasks already published stay in the broker"}
    return {"max_lost": 0, "text": "a gap in the metrics only; no task is affected"}


def _pool_children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as handle:
            return [int(p) for p in handle.read().split()]
    except OSError:
        return []


def _broker_sockets(pids: list[int], broker_port: int) -> dict[int, int]:
    """Local port -> bytes waiting unread, for each TCP connection of ``pids`` to ``broker_port`` (from /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    sockets = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            local, remote, queues, inode = cols[1], cols[2], cols[4], cols[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == broker_port:
                sockets[int(local.rsplit(":", 1)[1], 16)] = int(queues.split(":")[1], 16)
    return sockets


# System calls an event loop blocks in while it waits for I/O (x86_64 and aarch64 numbers): epoll_wait/epoll_pwait/
# epoll_pwait2, poll/ppoll, select/pselect6.
_WAITING_FOR_IO = {"x86_64": {232, 281, 441, 7, 271, 23, 270},
                   "aarch64": {22, 441, 73, 72}}.get(platform.machine())


def _waiting_for_io(pid: int) -> bool:
    """True when the (stopped) process's main thread sits in its event loop's poll, i.e. not between reading a
    message and recording it as unacknowledged (kombu does both in one call, without returning to the loop)."""
    if _WAITING_FOR_IO is None:
        return True  # an architecture whose numbers are not listed: do not hold the fault back on it
    try:
        with open(f"/proc/{pid}/syscall") as handle:
            number = handle.read().split()[0]
    except (OSError, IndexError):
        return True  # cannot tell (no /proc access)
    return number.lstrip("-").isdigit() and int(number) in _WAITING_FOR_IO


def _crash_worker_at_rest(worker, broker_url: str) -> str:
    """Freezes worker 1 (SIGSTOP) while the Redis broker holds writes (CLIENT PAUSE WRITE: no push can wake a BRPOP)
    and no broker reply waits unread in its sockets or half-handled in the process (its main thread is back in the
    event loop's poll), then has the broker drop its connections, so the SIGKILL that follows cannot race a delivery.
    Publishers wait a few milliseconds; nothing they send is lost.

    Why: the kernel closes a killed process's sockets only after freeing its memory (milliseconds for a Celery
    worker); meanwhile Redis still serves the dead client's BRPOP and the message it pops is gone. That race is
    kombu's Redis in-transit gap, reported as its own bound; the fault itself is the crash of a worker holding tasks."""
    from urllib.parse import urlparse

    import redis

    pids = [worker.pid, *_pool_children(worker.pid)]
    client = redis.Redis.from_url(broker_url, socket_timeout=2)
    try:
        for _ in range(200):
            client.execute_command("CLIENT", "PAUSE", 2000, "WRITE")  # expires by itself if loadlab dies here
            os.killpg(worker.pid, signal.SIGSTOP)
            sockets = _broker_sockets(pids, urlparse(broker_url).port or 6379)
            held = [c for c in client.client_list() if int(c["addr"].rsplit(":", 1)[1]) in sockets
                    and "b" in c["flags"] and c["cmd"] != "brpop"]
            if not any(sockets.values()) and not held and _waiting_for_io(worker.pid):
                break
            # a reply landed before the pause, the worker is between reading a message and recording it as
            # unacknowledged, or that write is held by the pause: let the worker finish, then try again
            os.killpg(worker.pid, signal.SIGCONT)
            client.execute_command("CLIENT", "UNPAUSE")
            time.sleep(0.005)
        try:
            for entry in client.client_list():
                if int(entry["addr"].rsplit(":", 1)[1]) in sockets:
                    try:
                        client.client_kill_filter(_id=entry["id"])
                    except redis.ResponseError:
                        pass  # already gone
        finally:
            client.execute_command("CLIENT", "UNPAUSE")
    finally:
        client.close()
    return f"froze it, had the broker drop its {len(sockets)} connections, "


def apply(fault: Fault, stack, log=print) -> None:
    """Applies one fault to a running ``loadlab.stack.supervisor.Stack`` and waits until the stack is whole again."""
    started = time.monotonic()
    fault.applied_at = time.time()
    if fault.kind == "kill-worker-child":
        worker = stack.workers[0]
        children = _pool_children(worker.pid)
        if not children:
            fault.detail = "worker 1 has no pool process (pool solo or threads): nothing killed"
        else:
            os.kill(children[0], signal.SIGKILL)
            fault.detail = f"killed pool process {children[0]} of {worker.name}"
    elif fault.kind == "kill-worker":
        how = ""
        if stack.settings.broker.startswith(("redis://", "rediss://")):
            how = _crash_worker_at_rest(stack.workers[0], stack.settings.broker)
        stack.restart(stack.workers[0])
        stack.wait_worker(1)
        fault.detail = f"{how}killed and restarted {stack.workers[0].name}"
    else:
        # the restartable services: (Stack attribute, readiness wait, text when absent, text when done)
        attribute, wait, absent, done = {
            "restart-broker": ("redis", stack.wait_redis,
                               "the broker is external: loadlab restarts only its embedded Redis (skipped)",
                               "killed and restarted the embedded Redis broker"),
            "restart-api": ("api", stack.wait_api, "no API in this stack (skipped)",
                            "killed and restarted the producer API"),
            "kill-exporter": ("exporter", None, "no exporter (metrics off): skipped",
                              "killed and restarted the exporter"),
        }[fault.kind]
        if getattr(stack, attribute) is None or (fault.kind == "restart-broker" and not stack.broker_embedded):
            # an external broker is someone else's server (often shared): never restarted, the fault is skipped
            fault.applied_at = None
            fault.detail = absent
        else:
            stack.restart(getattr(stack, attribute))
            if wait is not None:
                wait()
            fault.detail = done
    fault.recovered_s = round(time.monotonic() - started, 3)
    log(f"chaos: {fault.kind} at {fault.at_s:g}s: {fault.detail} (whole again after {fault.recovered_s:.1f}s)")


# Faults that hit a process holding tasks (a worker or the broker); the API and the exporter hold none.
HOLDS_TASKS = {"kill-worker-child", "kill-worker", "restart-broker"}


def attribute_losses(faults: list[Fault], lost: dict[str, float]) -> list[str]:
    """Gives each lost task (id -> sent_at) to the first fault after it was sent that hit a process holding tasks
    (else to the first fault after it was sent); returns the ids sent after every fault."""
    unattributed = []
    applied = [f for f in faults if f.applied_at is not None]
    for task_id, sent_at in lost.items():
        later = [f for f in applied if sent_at <= f.applied_at]
        owner = next((f for f in later if f.kind in HOLDS_TASKS), later[0] if later else None)
        if owner is None:
            unattributed.append(task_id)
        else:
            owner.lost_ids.append(task_id)
    return unattributed
