"""The ledger sink writes without waiting for replies: every record must still arrive whole and in each writer's
order — from threads sharing the sink, from a forked child, through AUTH and SELECT — and a wrong password must
not pass silently into a connection that drops everything."""
import os
import subprocess
import threading

import msgpack
import redis

from loadlab.exporters.ledger import LedgerSink, channel_key
from loadlab.stack import embedded
from tests.conftest import unique, wait_until


def _records(client, run_id):
    return [msgpack.unpackb(raw, raw=False) for raw in client.lrange(channel_key(run_id), 0, -1)]


def _server(tmp_path, *extra):
    port = embedded.free_port()
    server = subprocess.Popen(embedded.redis_command(port, tmp_path) + list(extra), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    return port, server


def test_records_from_threads_and_a_forked_child_arrive_whole_and_in_order(tmp_path):
    secret = "pw-" + unique()
    port, server = _server(tmp_path, "--requirepass", secret)
    try:
        client = redis.Redis(port=port, password=secret, db=3)
        wait_until(lambda: _ping(client), 15, what="the embedded Redis")
        run_id = unique()
        sink = LedgerSink(f"redis://:{secret}@127.0.0.1:{port}/3", run_id)
        big = "x" * 200_000  # larger than a socket buffer: sendall must not interleave two writers' commands

        def write(writer):
            for i in range(300):
                sink.push(["S", f"{writer}-{i}", big if i % 50 == 0 else "t", float(i)])

        threads = [threading.Thread(target=write, args=(f"t{n}",)) for n in range(4)]
        for thread in threads:
            thread.start()
        pid = os.fork()
        if pid == 0:  # the child reconnects: it must not write into the parent's socket
            write("child")
            os._exit(0)
        for thread in threads:
            thread.join()
        assert os.waitpid(pid, 0)[1] == 0
        wait_until(lambda: client.llen(channel_key(run_id)) == 5 * 300, 10, what="every record")
        records = _records(client, run_id)
        for writer in ("t0", "t1", "t2", "t3", "child"):
            mine = [r for r in records if r[1].startswith(writer + "-")]
            assert [r[1] for r in mine] == [f"{writer}-{i}" for i in range(300)]
            assert all(r[2] == (big if int(r[3]) % 50 == 0 else "t") for r in mine)
    finally:
        server.kill()
        server.wait()


def test_a_wrong_password_connects_nothing_and_a_restarted_server_is_reconnected(tmp_path):
    port, server = _server(tmp_path, "--requirepass", "right")
    try:
        client = redis.Redis(port=port, password="right")
        wait_until(lambda: _ping(client), 15, what="the embedded Redis")
        run_id = unique()
        wrong = LedgerSink(f"redis://:wrong@127.0.0.1:{port}/0", run_id)
        wrong.push(["S", "lost"])
        assert wrong._socket is None  # refused at AUTH, not a reply-less connection dropping every record
        sink = LedgerSink(f"redis://:right@127.0.0.1:{port}/0", run_id)
        sink.push(["S", "before"])
        wait_until(lambda: client.llen(channel_key(run_id)) == 1, 10, what="the first record")
        client.client_kill_filter(_type="normal", skipme=True)  # the server drops the sink's connection
        # writes into the dropped connection fail at once or on the next write; then the sink reconnects
        wait_until(lambda: (sink.push(["S", "after"]), client.llen(channel_key(run_id)) >= 2)[1], 10,
                   what="a record after the reconnect")
        assert _records(client, run_id)[0] == ["S", "before"] and ["S", "after"] in _records(client, run_id)
    finally:
        server.kill()
        server.wait()


def _ping(client) -> bool:
    try:
        return client.ping()
    except redis.RedisError:
        return False
