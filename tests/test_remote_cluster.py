"""`RemoteTier` on a real Redis Cluster of 3 masters (issue 23): slots, ACLs, a node killed, a slot moved, a failover.

The cluster is started once for the module (three redis-server processes
with `cluster-enabled yes`, the slots split in three, joined by CLUSTER MEET)
and stopped by pid at the end; the node-kill test runs after the others that
share it. The failover test starts its own cluster of three masters and three
replicas. About 15 s in all.
"""

import contextlib
import time

import numpy as np
import pytest
import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry
from redis_server import RedisServer
from test_remote import no_hang  # noqa: F401 (autouse: fail, not hang)
from test_tiers import ROW, h

from jaxkv.tiers.remote import RemoteAccessError, RemoteTier

FP = bytes(range(32))
SLOTS = 16384


def start_cluster(base, replicas: bool = False) -> list[RedisServer]:
    """Three masters (slots 0-5460, 5461-10922, 10923-16383), then, if asked, one replica of each (nodes 3-5).

    Started in `base`; on any failure every node started is stopped before the error propagates.
    """
    count = 6 if replicas else 3
    options = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000")
    nodes = [RedisServer(base / f"node{i}", *options) for i in range(count)]
    try:
        for n in nodes:
            n.start()
        bounds = [0, 5461, 10923, SLOTS]
        for i, n in enumerate(nodes[:3]):
            with n.admin() as r:
                r.execute_command("CLUSTER", "ADDSLOTS", *range(bounds[i], bounds[i + 1]))
        with nodes[0].admin() as r:
            for n in nodes[1:]:
                r.execute_command("CLUSTER", "MEET", "127.0.0.1", n.port)
        deadline = time.monotonic() + 30  # about 2 s here; much more on a loaded machine
        for n in nodes:
            with n.admin() as r:
                while not _ready(r, count):
                    assert time.monotonic() < deadline, f"the {count}-node cluster never became ready"
                    time.sleep(0.05)
        for master, replica in zip(nodes[:3], nodes[3:], strict=False):
            with master.admin() as m, replica.admin() as r:
                r.execute_command("CLUSTER", "REPLICATE", m.execute_command("CLUSTER", "MYID"))
        for replica in nodes[3:]:
            with replica.admin() as r:
                while r.info("replication").get("master_link_status") != "up":
                    assert time.monotonic() < deadline, "a replica never synced"
                    time.sleep(0.05)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return nodes


def _ready(r, count: int) -> bool:
    info = r.execute_command("CLUSTER", "INFO")
    return b"cluster_state:ok" in info and f"cluster_known_nodes:{count}".encode() in info


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three masters on 127.0.0.1, started once for the module; always stopped."""
    nodes = start_cluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield nodes
    finally:
        for n in nodes:
            n.stop()


def cluster_client(nodes, **kwargs) -> RedisCluster:
    return RedisCluster(
        host="127.0.0.1",
        port=nodes[0].port,
        socket_timeout=0.5,
        socket_connect_timeout=0.5,
        retry=Retry(NoBackoff(), 0),
        **kwargs,
    )


def node_keys(nodes) -> list[int]:
    counts = []
    for n in nodes:
        with n.admin() as r:
            counts.append(r.dbsize())
    return counts


def test_blocks_spread_over_three_masters_and_read_back(cluster):
    client = cluster_client(cluster)
    tier = RemoteTier(client=client, prefix="spread:", fingerprint=FP, row_bytes=ROW, batch_blocks=8)
    rows = np.random.default_rng(1).integers(0, 256, (24, ROW), dtype=np.uint8)
    assert tier.put_many([(h(i), rows[i]) for i in range(24)]) == [True] * 24
    counts = node_keys(cluster)
    assert sum(counts) == 24 and min(counts) > 0, counts  # no hash tags: every master holds some
    out = np.zeros_like(rows)
    assert tier.get_many([(h(i), out[i]) for i in range(24)]) == [None] * 24 and out.tobytes() == rows.tobytes()
    assert tier.contains_many([h(i) for i in range(26)]) == [True] * 24 + [False] * 2
    assert tier.clear() == 24 and sum(node_keys(cluster)) == 0  # SCAN on every master
    client.close()


def test_an_acl_user_restricted_to_the_prefix_works_and_one_without_it_fails_once_at_open(cluster):
    for n in cluster:
        with n.admin() as r:
            r.execute_command("ACL", "SETUSER", "team", "on", ">team-pw", "~team-a:*", "+@all")
            r.execute_command("ACL", "SETUSER", "stranger", "on", ">stranger-pw", "~other:*", "+@all")
    client = cluster_client(cluster, username="team", password="team-pw")
    tier = RemoteTier(client=client, prefix="team-a:", fingerprint=FP, row_bytes=ROW)
    row = np.arange(ROW, dtype=np.uint8)
    assert tier.put_many([(h(i), row) for i in range(6)]) == [True] * 6
    out = np.zeros(ROW, np.uint8)
    assert tier.get_many([(h(5), out)]) == [None] and out.tobytes() == row.tobytes()
    assert tier.clear() == 6
    client.close()
    stranger = cluster_client(cluster, username="stranger", password="stranger-pw")
    with pytest.raises(
        RemoteAccessError, match=r"refuses this user \(NoPermissionError.*grant its ACL the keys 'team-a:\*'"
    ):
        RemoteTier(client=stranger, prefix="team-a:", fingerprint=FP, row_bytes=ROW)
    stranger.close()


def test_a_slot_migrated_during_a_run_is_followed(cluster):
    """MOVED (a slot moved since the client learned the map) and ASK (a slot half-migrated): rows read back exact."""
    client = cluster_client(cluster)
    tier = RemoteTier(client=client, prefix="move:", fingerprint=FP, row_bytes=ROW, batch_blocks=8)
    rows = np.random.default_rng(3).integers(0, 256, (8, ROW), dtype=np.uint8)
    assert tier.put_many([(h(i), rows[i]) for i in range(8)]) == [True] * 8
    ids = {n.port: i for i, n in enumerate(cluster)}
    with cluster[0].admin() as r:
        slot = r.execute_command("CLUSTER", "KEYSLOT", tier.key(h(0)))
    owner = cluster[ids[client.get_node_from_key(tier.key(h(0))).port]]
    target = next(n for n in cluster if n is not owner)
    with owner.admin() as src, target.admin() as dst:
        src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
        dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
        # Half-migrated: the key still on the source answers there; a new key of the slot would be ASKed over.
        out = np.zeros_like(rows)
        assert tier.get_many([(h(i), out[i]) for i in range(8)]) == [None] * 8 and out.tobytes() == rows.tobytes()
        src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", tier.key(h(0)))
        # Now ASK: the key is on the target while the slot is still migrating.
        out = np.zeros_like(rows)
        assert tier.get_many([(h(i), out[i]) for i in range(8)]) == [None] * 8 and out.tobytes() == rows.tobytes()
        for node in cluster:
            with node.admin() as r:
                r.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
    out = np.zeros_like(rows)  # MOVED: the client's slot map is stale
    assert tier.get_many([(h(i), out[i]) for i in range(8)]) == [None] * 8 and out.tobytes() == rows.tobytes()
    assert tier.corrupt == 0 and tier.unavailable == 0
    assert tier.clear() == 8
    client.close()


def test_a_single_server_refusing_the_user_fails_once_at_open_and_an_outage_does_not(redis_server, tmp_path):
    with redis_server.admin() as r:
        r.execute_command("ACL", "SETUSER", "stranger", "on", ">pw", "~other:*", "+@all")
    url = f"redis://stranger:pw@127.0.0.1:{redis_server.port}/0"
    with pytest.raises(RemoteAccessError, match=r"NoPermissionError.*'team-a:\*'"):
        RemoteTier(url, prefix="team-a:", fingerprint=FP, row_bytes=ROW)
    with pytest.raises(RemoteAccessError, match="AuthenticationError"):
        RemoteTier(f"redis://stranger:wrong@127.0.0.1:{redis_server.port}/0", fingerprint=FP, row_bytes=ROW)
    down = RedisServer(tmp_path / "down")  # a port nothing listens on: an outage, served on as misses
    tier = RemoteTier(down.url, fingerprint=FP, row_bytes=ROW, connect_timeout=0.2)
    assert not tier.available and tier.unavailable == 1
    with redis_server.admin() as r:
        assert r.keys("*") == []  # the access probe left nothing behind


def test_a_node_killed_mid_load_answers_misses_or_refusals_within_the_timeout(cluster):
    """Run last: it kills a master. Every answer is the stored row or an error; nothing waits past the timeouts."""
    client = cluster_client(cluster)
    tier = RemoteTier(client=client, prefix="kill:", fingerprint=FP, row_bytes=ROW, batch_blocks=8)
    rows = np.random.default_rng(2).integers(0, 256, (24, ROW), dtype=np.uint8)
    assert tier.put_many([(h(i), rows[i]) for i in range(24)]) == [True] * 24
    real = client.pipeline
    seen = [0]

    def pipeline(*args, **kwargs):  # kill node 2 as the second batch of GETs is sent
        seen[0] += 1
        if seen[0] == 2:
            cluster[2].stop()
        return real(*args, **kwargs)

    client.pipeline = pipeline
    out = np.zeros_like(rows)
    t0 = time.perf_counter()
    answers = tier.get_many([(h(i), out[i]) for i in range(24)])
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, elapsed  # socket/connect timeouts of 0.5 s, no retries: never a hang
    served = [i for i, a in enumerate(answers) if a is None]
    assert all(out[i].tobytes() == rows[i].tobytes() for i in served)  # never garbage
    assert len(served) < 24 and all(isinstance(a, Exception) for a in answers if a is not None)
    assert tier.corrupt == 0
    t0 = time.perf_counter()
    again = tier.get_many([(h(i), out[i]) for i in range(24)])  # unavailable now: answered without waiting
    assert time.perf_counter() - t0 < 5.0 and all(a is None or isinstance(a, Exception) for a in again)
    with contextlib.suppress(redis.RedisError):
        client.close()


def test_a_failover_to_a_replica_serves_the_blocks_again(tmp_path):
    """A master killed: misses or refusals within the timeouts, then its replica takes over and serves them exact."""
    nodes = start_cluster(tmp_path, replicas=True)
    try:
        client = cluster_client(nodes)
        tier = RemoteTier(client=client, prefix="failover:", fingerprint=FP, row_bytes=ROW, retry_interval=0.2)
        rows = np.random.default_rng(4).integers(0, 256, (24, ROW), dtype=np.uint8)
        assert tier.put_many([(h(i), rows[i]) for i in range(24)]) == [True] * 24
        for master in nodes[:3]:
            with master.admin() as r:
                assert r.execute_command("WAIT", 1, 2000) == 1  # the replica has every block
        nodes[2].stop()
        out = np.zeros_like(rows)
        deadline = time.monotonic() + 20
        while True:
            t0 = time.perf_counter()
            answers = tier.get_many([(h(i), out[i]) for i in range(24)])
            assert time.perf_counter() - t0 < 5.0  # every call bounded by the timeouts
            served = [i for i, a in enumerate(answers) if a is None]
            assert all(out[i].tobytes() == rows[i].tobytes() for i in served)  # never garbage, during or after
            if len(served) == 24:
                break
            assert time.monotonic() < deadline, f"still {24 - len(served)} blocks unserved after the failover"
            time.sleep(0.25)
        with nodes[5].admin() as r:
            assert r.info("replication")["role"] == "master"  # the replica took over
        assert tier.corrupt == 0
        with contextlib.suppress(redis.RedisError):
            client.close()
    finally:
        for n in nodes:
            n.stop()
