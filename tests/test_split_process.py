"""The scheduler side in one process, the worker side in another: plans and results cross pickled.

`TieredStore` holds indexes only, so a serving engine can run it in its
scheduler process while the worker, which owns the host rows, the disk tier
and the engine, runs where the cache lives (tests/split_sides.py). Pages
loaded in the worker's process are compared byte for byte with the pages
stored, through stores, loads, evictions, a corrupt block and a restart.
"""

import multiprocessing

import pytest
from split_sides import DISK_BLOCKS, h, scheduler_side, worker_side

TIMEOUT_S = 240


def test_scheduler_and_worker_in_two_processes(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    directory = str(tmp_path / "blocks")
    # One-way pipes (os.pipe), not socket pairs: the scheduler's process must end with no socket open.
    from_scheduler, to_worker = ctx.Pipe(duplex=False)
    from_worker, to_scheduler = ctx.Pipe(duplex=False)
    results, report = ctx.Pipe(duplex=False)
    worker = ctx.Process(target=worker_side, args=(from_scheduler, to_scheduler, directory), daemon=True)
    scheduler = ctx.Process(target=scheduler_side, args=(to_worker, from_worker, directory, report), daemon=True)
    worker.start()
    scheduler.start()
    try:
        if not results.poll(TIMEOUT_S):
            pytest.fail(f"the scheduler's process sent nothing in {TIMEOUT_S} s")
        status, found = results.recv()
        assert status == "ok", found
    finally:
        scheduler.join(10)
        to_worker.send(("stop",))
        worker.join(30)
        for p in (scheduler, worker):
            if p.is_alive():
                p.kill()

    # Six blocks stored through three host slots; the disk (four blocks) evicted the two oldest, and said so.
    assert found["evicted"] == [h(0), h(1)]
    assert found["after store"] == [None, None, "disk", "host", "host", "host"]
    status, sources, exact = found["load"]
    assert status == "loaded" and sources == ("host", "host", "disk") and exact == [True] * 3
    status, lost, corrupt, where = found["corrupt load"]
    assert status == "refused" and lost == {"disk": (h(3),)} and corrupt == {"disk": 1} and where is None
    assert found["corrupt metric"] == 1
    assert found["restart held"] and found["restart lookup"] == ["disk"] * 3
    assert found["restart load"] == ("loaded", [True] * 3)
    # The scheduler's process never started a JAX backend, opened a block file or a socket.
    assert found["backends"] == [] and found["open in directory"] == [] and found["sockets"] == []
    assert not found["redis imported"] and DISK_BLOCKS == 4
