"""Data parallelism over the local devices: one batch axis split over them, states replicated, batches
prefetched.

The train step is `jax.pmap`-ed over the mapped axis `AXIS`; each device takes `batch_size /
num_devices` patches. With several processes (`flaxdose.training.distributed`), each process
feeds its own devices with its slice of the one global batch.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np

AXIS = "devices"


def device_sharding(devices) -> jax.sharding.NamedSharding:
    """Leading axis split over `devices`: the layout `jax.pmap` takes and returns."""
    mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def replicate(tree, devices):
    n, sharding = len(devices), device_sharding(devices)
    return jax.tree.map(lambda x: jax.device_put(np.broadcast_to(x, (n, *np.shape(x))), sharding), tree)


def unreplicate(tree):
    return jax.tree.map(lambda x: np.asarray(x[0]), tree)


def shard_to_devices(batch, devices):
    """Split the leading (global batch) axis over `devices` and start the transfer."""
    n, sharding = len(devices), device_sharding(devices)
    return jax.tree.map(lambda x: jax.device_put(x.reshape(n, x.shape[0] // n, *x.shape[1:]), sharding), batch)


def process_slice(batch, index: int, count: int):
    """Process `index` of `count`'s rows [index*B/count, (index+1)*B/count) of a global batch of B."""
    if count == 1:
        return batch
    return jax.tree.map(lambda x: x[index * (x.shape[0] // count) : (index + 1) * (x.shape[0] // count)], batch)


def prefetch(iterator, devices, size: int = 2, global_batches: bool = True) -> Iterator[tuple[Any, dict]]:
    """Yield (device batch, iterator state after that batch), keeping `size` batches in flight.

    The state travels with its batch, so a checkpoint records exactly the batches consumed.
    With several processes, each one's iterator yields the same global batch (same pipeline,
    same seed) and the process keeps its slice: pmap's global device axis then sees exactly
    the batch a single process would, split the same way. `global_batches=False`: the batches
    are this process's own (a sweep's runs), used whole.
    """
    index, count = (jax.process_index(), jax.process_count()) if global_batches else (0, 1)
    queue = collections.deque()
    while True:
        while len(queue) < size:
            batch = process_slice(next(iterator), index, count)
            queue.append((shard_to_devices(batch, devices), iterator.get_state()))
        yield queue.popleft()
