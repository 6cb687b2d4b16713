"""Authenticated blocks (issue 23): with a deployment key, disk and remote tiers serve only blocks sealed under it.

A forger who can write to the server or the directory can compute a valid
header and xxh3 checksum for any block hash; only the MAC (keyed BLAKE3 over
header and payload) tells their value from one the deployment wrote.
"""

import hashlib
import os
import signal

import numpy as np
import pytest
from cachegen import random_buffer, tp_mesh
from test_tiers import BF16_MHA, ROW, all_pages, h, offload

from jaxkv import HostTier, OffloadWorker, RowLayout, TieredStore, allocate_buffer
from jaxkv.tiers.blockformat import (
    HEADER,
    HEADER_BYTES,
    KEY_ENV,
    MAC_BYTES,
    VERSION,
    VERSION_KEYED,
    BlockKey,
    ForgedBlockError,
    KeyedBlockError,
    checksum,
)
from jaxkv.tiers.disk import SUFFIX, DiskTier
from jaxkv.tiers.remote import RemoteTier

KEY = b"deployment secret: 32 bytes long"
OTHER_KEY = b"another deployment's own secret!"
FP = hashlib.sha256(b"layout").digest()


@pytest.fixture(autouse=True)
def no_key_in_the_environment(monkeypatch):
    """Tests choose their keys; a `$JAXKV_BLOCK_KEY` of the machine running them must not choose for them."""
    monkeypatch.delenv(KEY_ENV, raising=False)


@pytest.fixture(autouse=True)
def no_hang():
    def expired(*_):
        raise TimeoutError("test still running after 60 s: something waits without a timeout")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def forged_value(block_hash: bytes, payload: bytes, *, version: int = VERSION, trailer: bytes = b"") -> bytes:
    """What anyone who can write can build: a header with the right fingerprint, hash, length and checksum."""
    return HEADER.pack(b"JAXKVBLK", version, HEADER_BYTES, FP, block_hash, len(payload), checksum(payload)) + (
        payload + trailer
    )


def remote(url, key=None, **kwargs) -> RemoteTier:
    return RemoteTier(url, fingerprint=FP, row_bytes=ROW, key=key, socket_timeout=2, **kwargs)


# -- the key ----------------------------------------------------------------------------------------------------------


def test_a_key_is_checked_and_never_shown(monkeypatch):
    with pytest.raises(ValueError, match=r"key must be at least 16 bytes \(a deployment secret\), got 5 bytes"):
        BlockKey(b"short")
    with pytest.raises(ValueError, match="key must be bytes or str"):
        BlockKey(1234567890123456789)  # type: ignore[arg-type]
    assert BlockKey(KEY.decode()).key_id == BlockKey(KEY).key_id != BlockKey(OTHER_KEY).key_id
    assert KEY.decode() not in repr(BlockKey(KEY))
    monkeypatch.setenv(KEY_ENV, "too short")
    with pytest.raises(ValueError, match=r"\$JAXKV_BLOCK_KEY must be at least 16 bytes"):
        BlockKey.resolve(None)
    monkeypatch.setenv(KEY_ENV, KEY.decode())
    assert BlockKey.resolve(None).key_id == BlockKey(KEY).key_id  # type: ignore[union-attr]
    monkeypatch.setenv(KEY_ENV, "")
    assert BlockKey.resolve(None) is None


# -- remote -----------------------------------------------------------------------------------------------------------


def test_remote_keyed_values_carry_a_mac_and_read_back(redis_server):
    tier = remote(redis_server.url, KEY)
    row = np.arange(ROW, dtype=np.uint8)
    assert tier.put_many([(h(0), row)]) == [True]
    with redis_server.admin() as r:
        value = r.get(tier.key(h(0)))
    assert len(value) == HEADER_BYTES + ROW + MAC_BYTES == tier.block_bytes
    assert HEADER.unpack_from(value)[1] == VERSION_KEYED
    out = np.zeros(ROW, np.uint8)
    assert tier.get_many([(h(0), out)]) == [None] and out.tobytes() == row.tobytes()
    assert "key id" in repr(tier) and KEY.decode() not in repr(tier)
    tier.close()


def unkeyed_forgery(r, key, block_hash, payload):
    r.set(key, forged_value(block_hash, payload))


def keyed_header_random_mac(r, key, block_hash, payload):
    r.set(key, forged_value(block_hash, payload, version=VERSION_KEYED, trailer=os.urandom(MAC_BYTES)))


def sealed_under_another_key(r, key, block_hash, payload):
    port = r.connection_pool.connection_kwargs["port"]
    other = RemoteTier(f"redis://127.0.0.1:{port}/0", key=OTHER_KEY, fingerprint=FP, row_bytes=ROW)
    r.delete(key)  # write-once: the forger removes the genuine value first
    other.put_many([(block_hash, np.frombuffer(payload, np.uint8))])
    other.close()


def altered_after_sealing(r, key, block_hash, payload):
    value = bytearray(r.get(key))
    value[HEADER_BYTES + 7] ^= 1
    fields = list(HEADER.unpack_from(value))
    fields[-1] = checksum(bytes(value[HEADER_BYTES : HEADER_BYTES + ROW]))  # checksum kept valid
    HEADER.pack_into(value, 0, *fields)
    r.set(key, bytes(value))


FORGERIES = [unkeyed_forgery, keyed_header_random_mac, sealed_under_another_key, altered_after_sealing]


@pytest.mark.parametrize("forge", FORGERIES, ids=[f.__name__ for f in FORGERIES])
def test_remote_a_forged_value_is_a_counted_miss_deleted_and_never_copied(forge, redis_server):
    tier = remote(redis_server.url, KEY)
    genuine = np.arange(ROW, dtype=np.uint8)
    assert tier.put_many([(h(0), genuine), (h(1), genuine)]) == [True, True]
    planted = np.full(ROW, 0x66, np.uint8).tobytes()  # the attacker's K/V
    with redis_server.admin() as r:
        forge(r, tier.key(h(0)), h(0), planted)
        assert r.exists(tier.key(h(0)))
    out = np.full(ROW, 0x11, np.uint8)
    (answer,) = tier.get_many([(h(0), out)])
    assert isinstance(answer, ForgedBlockError), answer
    assert (out == 0x11).all()  # not one byte of the forged value reached the row
    assert (tier.forged, tier.corrupt) == (1, 1)
    with redis_server.admin() as r:
        assert not r.exists(tier.key(h(0))) and r.exists(tier.key(h(1)))  # deleted; nothing else
    assert tier.get_many([(h(1), out)]) == [None] and out.tobytes() == genuine.tobytes()
    tier.close()


def test_remote_without_a_key_trusts_unkeyed_values_and_leaves_keyed_ones(redis_server):
    keyed, unkeyed = remote(redis_server.url, KEY), remote(redis_server.url, prefix="plain:")
    row = np.arange(ROW, dtype=np.uint8)
    keyed.put_many([(h(0), row)])
    with redis_server.admin() as r:
        r.set(unkeyed.key(h(0)), r.get(keyed.key(h(0))))  # a keyed value under the unkeyed tier's key
        r.set(unkeyed.key(h(1)), forged_value(h(1), row.tobytes()))  # unkeyed: trusted, as before keys existed
    out = np.zeros(ROW, np.uint8)
    (answer,) = unkeyed.get_many([(h(0), out)])
    assert isinstance(answer, KeyedBlockError) and (unkeyed.corrupt, unkeyed.keyed_values) == (0, 1)
    with redis_server.admin() as r:
        assert r.exists(unkeyed.key(h(0)))  # another deployment's to judge: left
    assert unkeyed.get_many([(h(1), out)]) == [None] and out.tobytes() == row.tobytes()
    keyed.close()
    unkeyed.close()


def test_a_forged_block_is_never_loaded_into_the_cache(redis_server):
    """Through a composition: a planted value makes the load refused, the cache unchanged, `corrupt` counted."""
    src, _, _ = random_buffer(BF16_MHA, 2, 8)
    tier = RemoteTier(redis_server.url, key=KEY, socket_timeout=2)
    worker = OffloadWorker(src, [HostTier(2 * ROW), tier])
    store = TieredStore(worker.spec(), probe=worker.probe)
    offload(store, worker, src, [0, 1, 2, 3], [h(i) for i in range(4)])  # h0, h1 only on the server
    layout = RowLayout.of(src)
    with redis_server.admin() as r:
        header = HEADER.pack(b"JAXKVBLK", VERSION, HEADER_BYTES, layout.stored.fingerprint, h(0), ROW, 0)
        payload = np.full(ROW, 0x66, np.uint8).tobytes()
        r.set(tier.key(h(0)), header[:-8] + checksum(payload).to_bytes(8, "little") + payload)
    fresh = allocate_buffer(BF16_MHA, tp_mesh(2), 8)
    before = all_pages(fresh)
    plan = store.prepare_load([h(0), h(1)], [6, 7])
    cache, handle = worker.load(fresh, plan)
    assert handle.status == "refused" and cache is fresh and all_pages(cache) == before
    store.complete_load(handle.result())
    assert (tier.forged, store.metrics["remote"].corrupt) == (1, 1) and store.lookup([h(0)]) == []
    worker.close()


# -- disk -------------------------------------------------------------------------------------------------------------


def disk(directory, key=None, capacity=1 << 20) -> DiskTier:
    return DiskTier(directory, capacity, fingerprint=FP, row_bytes=ROW, key=key)


def test_disk_keyed_blocks_round_trip_and_restart(tmp_path):
    tier = disk(tmp_path, KEY)
    row = np.arange(ROW, dtype=np.uint8)
    tier.put(h(0), row)
    path = tmp_path / (h(0).hex() + SUFFIX)
    assert path.stat().st_size == HEADER_BYTES + ROW + MAC_BYTES == tier.block_bytes
    again = disk(tmp_path, KEY.decode())
    assert h(0) in again and again.get(h(0)).tobytes() == row.tobytes() and again.corrupt == 0


def test_disk_a_forged_or_foreign_keyed_file_is_a_miss_and_removed(tmp_path):
    tier = disk(tmp_path, KEY)
    genuine = np.arange(ROW, dtype=np.uint8)
    for i in range(3):
        tier.put(h(i), genuine)
    planted = np.full(ROW, 0x66, np.uint8)
    (tmp_path / (h(0).hex() + SUFFIX)).write_bytes(forged_value(h(0), planted.tobytes()))
    disk(tmp_path / "other", OTHER_KEY).put(h(1), planted)
    os.replace(tmp_path / "other" / (h(1).hex() + SUFFIX), tmp_path / (h(1).hex() + SUFFIX))
    outs = [np.full(ROW, 0x11, np.uint8) for _ in range(3)]
    answers = tier.get_many([(h(i), outs[i]) for i in range(3)])
    assert [type(a).__name__ for a in answers] == ["ForgedBlockError", "ForgedBlockError", "NoneType"]
    assert (tier.forged, tier.corrupt) == (2, 2) and len(tier) == 1
    assert not (tmp_path / (h(0).hex() + SUFFIX)).exists() and not (tmp_path / (h(1).hex() + SUFFIX)).exists()
    assert outs[2].tobytes() == genuine.tobytes()


def test_disk_start_up_removes_unkeyed_files_for_a_keyed_tier_and_an_unkeyed_tier_leaves_keyed_ones(tmp_path):
    disk(tmp_path).put(h(0), np.zeros(ROW, np.uint8))  # unkeyed, as written before keys existed
    disk(tmp_path / "k", KEY).put(h(1), np.ones(ROW, np.uint8))
    os.replace(tmp_path / "k" / (h(1).hex() + SUFFIX), tmp_path / (h(1).hex() + SUFFIX))
    os.rmdir(tmp_path / "k")
    unkeyed = disk(tmp_path)
    assert h(0) in unkeyed and h(1) not in unkeyed and (unkeyed.skipped_entries, unkeyed.corrupt) == (1, 0)
    keyed = disk(tmp_path, KEY)
    assert h(1) in keyed and h(0) not in keyed and (keyed.forged, keyed.corrupt) == (1, 1)
    assert not (tmp_path / (h(0).hex() + SUFFIX)).exists()  # an unkeyed file proves nothing to a keyed tier
    assert (tmp_path / (h(1).hex() + SUFFIX)).exists()


def test_remote_keyed_batches_sealed_beside_the_network_land_whole(redis_server):
    """Several batches: each is sealed on the helper thread while the one before is sent; every value verifies."""
    tier = remote(redis_server.url, KEY, batch_blocks=2)
    rows = np.random.default_rng(0).integers(0, 256, (7, ROW), dtype=np.uint8)
    assert tier.put_many([(h(i), rows[i]) for i in range(7)]) == [True] * 7
    out = np.zeros_like(rows)
    assert tier.get_many([(h(i), out[i]) for i in range(7)]) == [None] * 7
    assert out.tobytes() == rows.tobytes() and (tier.corrupt, tier.forged) == (0, 0)
    redis_server.stop()  # a failed batch: every block after it answers unavailable, nothing hangs
    answers = tier.put_many([(h(10 + i), rows[i]) for i in range(5)])
    assert [type(a).__name__ for a in answers] == ["RemoteUnavailable"] * 5
    tier.close()


def test_a_bad_key_is_refused_before_anything_is_touched(tmp_path, redis_server):
    with pytest.raises(ValueError, match=r"key must be at least 16 bytes .* got 5 bytes"):
        DiskTier(tmp_path / "blocks", 1 << 20, fingerprint=FP, row_bytes=ROW, key="short")
    assert not (tmp_path / "blocks").exists()
    with pytest.raises(ValueError, match="key must be bytes or str"):
        remote(redis_server.url, key=12345)
    with redis_server.admin() as r:
        assert r.keys("*") == []
