"""Safe defaults: an embedded stack listens on loopback only, and passwords never reach logs, reports or settings."""
import json
import os
import socket
import subprocess
from pathlib import Path

from loadlab.config.settings import Settings
from loadlab.stack import embedded
from loadlab.stack.supervisor import Stack
from tests.conftest import run_cli, unique, wait_until


def _process_group_pids(pgids: set[int]) -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) in pgids:
                    pids.add(int(entry))
            except ProcessLookupError:
                pass
    return pids


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def _listening() -> dict[str, str]:
    """inode -> local address of every listening TCP socket on the machine."""
    found = {}
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A":  # LISTEN
                continue
            address_hex, port_hex = fields[1].split(":")
            raw = bytes.fromhex(address_hex)
            # /proc prints each 32-bit word in host (little-endian) order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[fields[9]] = f"{socket.inet_ntop(family, raw)}:{int(port_hex, 16)}"
    return found


def test_embedded_stack_listens_on_loopback_only(run_dir):
    with Stack(Settings.build(run_id=unique(), workers="2"), run_dir) as stack:
        pids = _process_group_pids({child.pid for child in stack.children()})
        listening = _listening()
        ours = {inode: listening[inode] for pid in pids for inode in _socket_inodes(pid) if inode in listening}
        assert len(ours) >= 2, ours  # at least the embedded Redis and the producer API
        outside = [address for address in ours.values()
                   if not (address.startswith("127.") or address.startswith("::1:"))]
        assert not outside, f"listening beyond loopback: {outside}"


def test_passwords_never_reach_files_or_output(tmp_path):
    """A broker that needs a password: the run works, and no file of the run nor its output shows it."""
    secret = "s3cr3t-" + unique()
    port = embedded.free_port()
    server = subprocess.Popen(embedded.redis_command(port, tmp_path) + ["--requirepass", secret],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: embedded_ping(port, secret), 15, what="the password-protected Redis")
        out = tmp_path / "run"
        url = f"redis://:{secret}@127.0.0.1:{port}"
        result = run_cli("run", "smoke", "--duration", "3s", "--broker", f"{url}/0", "--backend", f"{url}/1",
                         "--out", str(out), timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads((out / "report.json").read_text())["tasks"]["succeeded"] > 0
        assert "***" in (out / "settings.json").read_text()
        leaks = [str(p) for p in out.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
        assert not leaks, leaks
        assert secret not in result.stdout + result.stderr
    finally:
        server.terminate()
        server.wait(timeout=10)


def embedded_ping(port: int, password: str) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, password=password, socket_connect_timeout=0.5).ping())
    except Exception:  # noqa: BLE001
        return False


def test_ports_for_the_stack_s_listeners_are_free_and_below_the_kernel_s_ephemeral_range():
    # outgoing connections take ephemeral ports: one could take a port picked for a child before the child binds it
    import socket

    low = embedded._ephemeral_ports_start()
    ports = [embedded.free_port() for _ in range(20)]
    assert all(embedded.LISTEN_PORTS_FLOOR <= port < low for port in ports) and len(set(ports)) > 15
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", ports[0]))
        taken.listen()
        assert not embedded._can_listen(ports[0])
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", embedded.free_port()))  # a port it gives can be listened on
