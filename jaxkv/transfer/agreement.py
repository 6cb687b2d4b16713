"""Multi-controller JAX: which processes a cache spans, and agreeing across them.

Under `jax.distributed` every process runs the same program on its own
devices. A cache whose mesh spans several processes is moved by each process
for the shards it owns: `to_memory()` returns units for the addressable
shards only, each process keeps its own host pool and disk tier, and no byte
crosses a process boundary. What must cross is a few integers, so that every
process answers the scheduler the same way: `GroupAgreement.min` agrees on
the minimum of one int across the processes of a TP group (a block counts as
present only if every process holds it).

Two mechanisms:

- ``"store"`` (default): the key-value store and barriers of the
  `jax.distributed` coordination service, on the host, off the device
  streams. Every call has a timeout: a dead or stuck peer surfaces as
  `GroupAgreementError` instead of a hang. Three small RPCs per process per
  call (set, barrier, directory read), whatever the group size.
- ``"collective"``: a jitted min over the cache's devices. For runtimes
  without a coordination client. It queues behind device work and a dead
  peer makes it wait for the backend's collective timeout, so it is not the
  default. It needs no private JAX API.

JAX has no public accessor for the coordination client: jaxkv reads it in
`jaxkv._jax_compat.coordination_client`, on the JAX versions where it was
checked. Where that answers None although `jax.distributed` is initialized,
``"auto"`` warns and takes the collective.

Calls are matched by order, like collectives: every process of the group
must make the same calls in the same order, which it does when it runs the
same scheduler on the same inputs.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections.abc import Iterable
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxkv import _jax_compat
from jaxkv._checks import check_positive_seconds
from jaxkv.layout.buffer import Cache, KVCacheBuffer, MultiKVCacheBuffer

MECHANISMS = ("auto", "store", "collective")

DEFAULT_TIMEOUT_S = 60.0
"""How long a process waits for its peers. A peer that is slower by more than
this (a scheduler step's worth of skew is milliseconds to seconds) is taken for
dead. Shorter than `jax.distributed`'s default heartbeat timeout (100 s), so a
dead peer surfaces as a jaxkv error before the runtime stops the process."""

_instances = itertools.count()  # names agreements identically in every process (same creation order)


class GroupAgreementError(RuntimeError):
    """The processes of a TP group could not agree (a peer died or fell behind).

    The group is out of step after this: the agreement refuses further calls,
    and the processes must be restarted together.
    """


def cache_arrays(cache: Cache) -> list[jax.Array]:
    """The values/scales arrays of a KVCacheBuffer or MultiKVCacheBuffer (empty for anything else)."""
    if isinstance(cache, MultiKVCacheBuffer):
        children = list(cache.children.values())
    elif isinstance(cache, KVCacheBuffer):
        children = [cache]
    else:
        return []
    return [a for c in children for a in (c.values, c.scales) if a is not None]


def cache_processes(cache: Cache) -> tuple[int, ...]:
    """The process indices of every device the cache spans, sorted."""
    return tuple(sorted({d.process_index for a in cache_arrays(cache) for d in a.sharding.device_set}))


def spans_processes(cache: Cache) -> bool:
    """Whether the cache's devices belong to more than one process."""
    return len(cache_processes(cache)) > 1


class GroupAgreement:
    """Agrees on the minimum of one int across the processes of a TP group.

    `min(value)` blocks until every process of `processes` has called it (the
    n-th call of each process is matched with the n-th call of the others)
    and returns the smallest value any of them passed.
    """

    def __init__(
        self,
        processes: Iterable[int],
        *,
        mesh: jax.sharding.Mesh | None = None,
        name: str | None = None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        mechanism: str = "auto",
    ):
        self.processes = tuple(sorted(int(p) for p in processes))
        """The process indices that take part, sorted."""
        if jax.process_index() not in self.processes:
            raise ValueError(f"this process ({jax.process_index()}) is not in processes {list(self.processes)}")
        timeout_s = check_positive_seconds("timeout_s", timeout_s)
        if mechanism not in MECHANISMS:
            raise ValueError(f"mechanism must be one of {MECHANISMS}, got {mechanism!r}")
        # The collective needs no client: only "auto" and "store" reach for it.
        client = None if mechanism == "collective" else _jax_compat.coordination_client()
        if mechanism == "auto":
            mechanism = "store" if client is not None else "collective"
            if client is None and jax.distributed.is_initialized():
                warnings.warn(
                    f"{_jax_compat.coordination_client_unavailable()}: GroupAgreement falls back to "
                    "mechanism='collective' (a dead peer surfaces after the backend's collective timeout, "
                    "not after timeout_s)",
                    RuntimeWarning,
                    stacklevel=2,
                )
        if mechanism == "store" and client is None:
            if jax.distributed.is_initialized():
                raise ValueError(
                    f"mechanism 'store' needs the coordination client: "
                    f"{_jax_compat.coordination_client_unavailable()}; use mechanism='collective'"
                )
            raise ValueError(
                "mechanism 'store' needs the jax.distributed coordination service: call "
                "jax.distributed.initialize() first, or use mechanism='collective'"
            )
        if mechanism == "collective" and mesh is None:
            raise ValueError("mechanism 'collective' needs the mesh of the TP group (mesh=)")
        self.mechanism = mechanism
        """'store' (coordination service) or 'collective' (a jitted min over the mesh)."""
        if name is None:
            # Same in every process of the group (agreements are created in the same
            # order everywhere), distinct between groups that share the coordinator.
            name = f"jaxkv/agreement/{'-'.join(map(str, self.processes))}/{next(_instances)}"
        self.name = name
        """The key prefix of this agreement in the coordination service."""
        self.timeout_s = float(timeout_s)
        self.calls = 0
        """Completed `min` calls."""
        self.seconds = 0.0
        """Wall time spent in `min`, waiting for peers included."""
        self._client: Any = client  # jaxlib's coordination client (no type stub); None unless 'store'
        self._mesh = mesh
        self._collective = None
        self._broken: str | None = None

    @classmethod
    def for_cache(cls, cache: Cache, **kwargs: Any) -> GroupAgreement | None:
        """The agreement over the processes `cache` spans; None when it spans one (no cost at all)."""
        processes = cache_processes(cache)
        if len(processes) < 2:
            return None
        (array, *_) = cache_arrays(cache)
        sharding = cast(NamedSharding, array.sharding)  # every cache array's: checked when the cache was built
        return cls(processes, mesh=cast(Mesh, sharding.mesh), **kwargs)

    def min(self, value: int) -> int:
        """The minimum of `value` over the group. Raises `GroupAgreementError` on timeout."""
        if self._broken is not None:
            raise GroupAgreementError(f"{self.name} failed earlier ({self._broken}); the TP group is out of step")
        t0 = time.perf_counter()
        seq = self.calls
        try:
            out = self._store_min(seq, int(value)) if self.mechanism == "store" else self._collective_min(int(value))
        except Exception as e:
            self._broken = f"call {seq}: {type(e).__name__}"
            raise GroupAgreementError(
                f"processes {list(self.processes)} did not agree on {self.name} call {seq} within "
                f"{self.timeout_s:g} s (a peer died, or runs a different sequence of calls): {e}"
            ) from e
        self.calls += 1
        self.seconds += time.perf_counter() - t0
        return out

    def _store_min(self, seq: int, value: int) -> int:
        me = jax.process_index()
        client = self._client
        client.key_value_set(f"{self.name}/{seq}/{me}", str(value))
        subset = None if len(self.processes) == jax.process_count() else list(self.processes)
        client.wait_at_barrier(f"{self.name}/barrier/{seq}", int(self.timeout_s * 1000), subset)
        entries = client.key_value_dir_get(f"{self.name}/{seq}/")
        if len(entries) != len(self.processes):
            raise RuntimeError(f"expected {len(self.processes)} values after the barrier, found {len(entries)}")
        if seq:
            # Everyone passed this barrier, so everyone has read the previous call's values.
            client.key_value_delete(f"{self.name}/{seq - 1}/{me}")
        return min(int(v) for _, v in entries)

    def _collective_min(self, value: int) -> int:
        mesh = self._mesh
        assert mesh is not None  # __init__ requires one for mechanism 'collective'
        sharding = NamedSharding(mesh, P(tuple(mesh.axis_names)))
        if self._collective is None:
            self._collective = jax.jit(jnp.min, out_shardings=NamedSharding(mesh, P()))
        local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
        pieces = [jax.device_put(np.array([value], np.int32), d) for d in local]
        votes = jax.make_array_from_single_device_arrays((mesh.size,), sharding, pieces)
        return int(self._collective(votes).addressable_data(0))

    def __repr__(self) -> str:
        return f"GroupAgreement({self.name}, processes {list(self.processes)}, {self.mechanism}, {self.calls} calls)"
