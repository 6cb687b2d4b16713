"""`HostTier(backend="arrays")`: rows as pinned_host JAX arrays, bit-exact through the same plans and worker.

On CPU pinned_host exists, so the path GPUs/TPUs take by default runs here:
the D2H gather's outputs are the rows, the H2D scatter reads them.
"""

import resource

import jax
import pytest
from cachegen import random_buffer
from test_tiers import BF16_MHA, LAYOUT_IDS, LAYOUTS, all_pages, h, load, offload

import jaxkv.tiers.host as host_mod
from jaxkv import HostTier, TierPolicy, open_tiers


def compose_arrays(cache, host_bytes, directory=None, disk_bytes=None, **kwargs):
    return open_tiers(
        cache, host_bytes, disk_directory=directory, disk_capacity_bytes=disk_bytes, host_backend="arrays", **kwargs
    )


@pytest.mark.parametrize("params", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_round_trip_bit_exact(params, tp, kernels):
    cache, _, _ = random_buffer(params, tp, num_pages=8, seed=tp)
    want = all_pages(cache)
    row = params.host_bytes_per_page(tp)
    store, worker = compose_arrays(cache, 8 * row)
    assert worker.engine.d2h_path == worker.engine.h2d_path == "arrays"
    offload(store, worker, cache, [1, 2, 3, 5, 7], [h(i) for i in range(5)])
    for slot in (store.host.slot_of(h(i)) for i in range(5)):
        assert all(a.sharding.memory_kind == "pinned_host" for a in worker.host.arrays(slot))
    zero, _, _ = random_buffer(params, tp, num_pages=8, seed=99)
    other = all_pages(zero)
    zero, result = load(store, worker, zero, [h(i) for i in range(5)], [0, 6, 4, 2, 1])
    assert result.status == "loaded"
    got = all_pages(zero)
    for src, dst in zip([1, 2, 3, 5, 7], [0, 6, 4, 2, 1], strict=True):
        assert got[dst] == want[src]
    for p in (3, 5, 7):
        assert got[p] == other[p]


@pytest.mark.parametrize("params", LAYOUTS, ids=LAYOUT_IDS)
def test_through_disk_bit_exact(params, tmp_path):
    cache, _, _ = random_buffer(params, 2, num_pages=8, seed=3)
    want = all_pages(cache)
    row = params.host_bytes_per_page(2)
    store, worker = compose_arrays(cache, 2 * row, tmp_path, 16 * row)
    offload(store, worker, cache, list(range(6)), [h(i) for i in range(6)])
    assert worker.host.live_bytes <= 2 * row
    assert store.lookup([h(i) for i in range(6)])[:4] == ["disk"] * 4  # evicted from host, promoted on load
    zero, _, _ = random_buffer(params, 2, num_pages=8, seed=7)
    zero, result = load(store, worker, zero, [h(0), h(1)], [7, 6])
    assert result.status == "loaded" and result.promoted == (True, True)
    got = all_pages(zero)
    assert got[7] == want[0] and got[6] == want[1]
    assert store.where(h(0)) == "host"  # promoted into a pinned_host row
    on_disk = worker.tiers["disk"].get(h(0))
    assert bytes(worker.engine.read_host([store.host.slot_of(h(0))])[0]) == bytes(on_disk)


def test_churn_budget_and_rss():
    cache, _, _ = random_buffer(BF16_MHA, 2, num_pages=8, seed=1)
    row = BF16_MHA.host_bytes_per_page(2)
    store, worker = compose_arrays(cache, 4 * row)
    budget = 4 * row
    rss0 = None
    for i in range(10_000):
        offload(store, worker, cache, [i % 8], [h(i)])
        assert worker.host.live_bytes <= budget
        if i == 500:
            rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert worker.host.live_bytes == budget and store.host.evictions == 10_000 - 4
    assert rss1 - rss0 < 16 * 1024, f"peak RSS grew by {rss1 - rss0} KiB over 9,500 offload/evict cycles"


def test_gpu_limit_named_at_construction(monkeypatch):
    monkeypatch.setattr(host_mod, "_platform", lambda: "gpu")
    monkeypatch.delenv(host_mod.GPU_HOST_LIMIT_VAR, raising=False)
    assert HostTier(1 << 30).backend == "arrays"
    with pytest.raises(ValueError, match="XLA_PJRT_GPU_HOST_MEMORY_LIMIT_GB"):
        HostTier(65 << 30)
    monkeypatch.setenv(host_mod.GPU_HOST_LIMIT_VAR, "128")
    assert HostTier(65 << 30).backend == "arrays"
    assert HostTier(65 << 30, backend="numpy").backend == "numpy"  # the limit is pinned memory's only


def test_auto_is_numpy_on_cpu():
    assert jax.default_backend() == "cpu" and HostTier(1 << 20).backend == "numpy"
    with pytest.raises(ValueError, match="backend must be one of"):
        HostTier(1 << 20, backend="slab")


def test_freed_rows_are_released_with_the_next_plan(tmp_path):
    """A slot the scheduler frees (cleared, or a promotion not kept) loses its arrays when the next plan runs."""
    cache, _, _ = random_buffer(BF16_MHA, 2, num_pages=8, seed=1)
    want = all_pages(cache)
    row = BF16_MHA.host_bytes_per_page(2)
    policy = TierPolicy(promote_on_load=False)
    store, worker = compose_arrays(cache, 2 * row, tmp_path, 16 * row, policy=policy)
    offload(store, worker, cache, [1, 2, 3, 4], [h(i) for i in range(4)])  # disk: 4 blocks, host: the last 2
    assert worker.host.live_bytes == store.bytes()["host"][0] == 2 * row
    store.host.clear()  # the scheduler forgets both rows: the worker hears of it with the next plan
    assert store.bytes()["host"][0] == 0 and worker.host.live_bytes == 2 * row
    zero, _, _ = random_buffer(BF16_MHA, 2, num_pages=8, seed=5)
    zero, result = load(store, worker, zero, [h(0)], [7])  # promoted through a slot, then not kept
    assert result.status == "loaded" and all_pages(zero)[7] == want[1]
    assert (
        store.bytes()["host"][0] == 0 and worker.host.live_bytes == row
    )  # the cleared rows went; the promoted row waits
    offload(store, worker, cache, [5], [h(9)])  # the next plan releases it (or overwrites it)
    assert worker.host.live_bytes == store.bytes()["host"][0] == row
    assert bytes(worker.host.row(store.host.slot_of(h(9)))) == want[5]


def test_rows_freed_around_an_eviction_are_released_or_replaced(tmp_path):
    """live_bytes == used_bytes once the next plan ran, also when the freed slot was taken by evicting a block
    (a refused load) and when it is reserved again by the next plan before the worker heard of the drop
    (issue 24 item 6(b))."""
    cache, _, _ = random_buffer(BF16_MHA, 2, num_pages=8, seed=1)
    want = all_pages(cache)
    row = BF16_MHA.host_bytes_per_page(2)
    store, worker = compose_arrays(cache, 2 * row, tmp_path, 16 * row, policy=TierPolicy(promote_on_load=False))
    offload(store, worker, cache, [1, 2, 3], [h(i) for i in range(3)])  # disk: 3 blocks; host (full): h1, h2
    assert worker.host.live_bytes == store.bytes()["host"][0] == 2 * row

    # A load whose tail no tier holds: its one planned block evicts h1 to get a slot, is read, then refused.
    dst, _, _ = random_buffer(BF16_MHA, 2, num_pages=8, seed=5)
    plan = store.prepare_load([h(0), h(7)], [5, 6])
    assert plan.num_held == 1 and plan.sources == ("disk",) and store.host.slot_of(h(1)) is None
    dst, handle = worker.load(dst, plan)
    store.complete_load(handle.result())
    assert handle.result().status == "refused" and store.bytes()["host"][0] == row
    assert worker.host.live_bytes == 2 * row  # the refused promotion's row waits for the next plan
    dst, result = load(store, worker, dst, [h(2)], [6])  # the next plan, a load of a host block, releases it
    assert result.status == "loaded" and all_pages(dst)[6] == want[3]
    assert worker.host.live_bytes == store.bytes()["host"][0] == row

    # A promotion not kept frees its slot, and the next plan reserves that slot again (the pending drop is left
    # out) by storing a new block: the new row replaces the old arrays.
    dst, result = load(store, worker, dst, [h(0)], [5])
    assert result.status == "loaded" and all_pages(dst)[5] == want[1]
    assert store.bytes()["host"][0] == row and worker.host.live_bytes == 2 * row
    offload(store, worker, cache, [4], [h(8)])
    assert worker.host.live_bytes == store.bytes()["host"][0] == 2 * row
    assert bytes(worker.host.row(store.host.slot_of(h(8)))) == want[4]
