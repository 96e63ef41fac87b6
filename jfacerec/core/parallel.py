"""Device meshes, shardings and multi-process initialisation."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
# Splits the class weights of the softmax and margin heads by columns (see sharded_softmax.py).
MODEL_AXIS = "model"
# The batch is split over every device: the backbone is data parallel over the whole mesh.
BATCH_AXES = (DATA_AXIS, MODEL_AXIS)

def _tpu_pod_hosts() -> int:
    """How many hosts the TPU environment names (0 outside a TPU VM); no network calls."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return len([h for h in hosts.split(",") if h.strip()])


def maybe_initialize_distributed() -> None:
    """Joins a multi-process run when the environment describes one, and does nothing otherwise.

    `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`
    make this process one of many, on any platform (on CPU the processes' collectives go through
    gloo, over TCP). Without them, a multi-host TPU slice (`TPU_WORKER_HOSTNAMES` naming several
    hosts) is joined by `jax.distributed.initialize()`'s own cluster detection. A plain
    single-process run never initialises anything. Call it before anything else touches JAX's
    devices.
    """
    if jax.distributed.is_initialized():
        return
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        missing = [k for k in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if k not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} "
                             f"{'is' if len(missing) == 1 else 'are'} not")
        # Cross-process collectives of CPU devices (gloo, the default of this JAX, said
        # explicitly); JAX_CPU_COLLECTIVES_IMPLEMENTATION=mpi chooses MPI instead.
        if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]))
    elif _tpu_pod_hosts() > 1:
        jax.distributed.initialize()


def make_mesh(num_devices: int = 0, model: int = 1) -> Mesh:
    """A (data, model) mesh over the first `num_devices` devices (0: all).

    `model` devices share the class weights (columns split among them); `data` is the rest.
    `model=1` is plain data parallelism.
    """
    devices = jax.devices()
    if num_devices:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
        devices = devices[:num_devices]
    if model < 1 or len(devices) % model:
        raise ValueError(f"mesh.model={model} must divide the {len(devices)} devices")
    return Mesh(np.array(devices).reshape(len(devices) // model, model), (DATA_AXIS, MODEL_AXIS))


def mesh_from_config(config) -> Mesh:
    """The mesh of a training config: `num_devices` and `mesh.model`."""
    return make_mesh(config.num_devices, config.mesh.model)


def inference_mesh(config) -> Mesh:
    """The mesh a trained model runs inference on: the config's (`num_devices`, `mesh.model`) in
    one process; with several, every device of every process (`mesh.model` of them sharing the
    head), since each process computes its own devices' rows of every batch and a process with
    no device in the mesh could take no part."""
    if jax.process_count() == 1:
        return mesh_from_config(config)
    return make_mesh(0, config.mesh.model)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(sharding: NamedSharding, rows: int) -> slice:
    """The rows of an array [rows, ...] split by `sharding` (`data_sharding`) that this process's
    devices hold: one contiguous block, the mesh's devices being in process order (as
    `jax.make_array_from_process_local_data` expects them)."""
    spans = [index[0].indices(rows)[:2]
             for index in sharding.addressable_devices_indices_map((rows,)).values()]
    start, stop = min(s for s, _ in spans), max(e for _, e in spans)
    if sum(e - s for s, e in set(spans)) != stop - start:
        raise ValueError(f"this process's devices hold scattered rows of a {rows}-row batch; "
                         f"build the mesh from jax.devices() in their order (make_mesh)")
    return slice(start, stop)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def class_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """A per-class array split by classes over `model`: kernels [dim, C] by columns, biases [C]."""
    return NamedSharding(mesh, P(*([None] * (ndim - 1)), MODEL_AXIS))


# A class count that does not split over `model` is padded to a multiple of this, whatever the
# mesh: a head padded on 1x8 has the width a 4x2 or 8x1 mesh restores (every power of two up to
# 128 divides it), and 128 columns are a TPU lane's width.
CLASS_MULTIPLE = 128


def padded_classes(num_classes: int, mesh: Mesh) -> int:
    """The head's columns for `num_classes` classes on `mesh`: the classes themselves when they
    split evenly over `model` (checkpoints of such heads are unchanged), else the next multiple of
    CLASS_MULTIPLE. The padded columns are masked out of every loss, accuracy and logit."""
    model = mesh.shape[MODEL_AXIS]
    if num_classes % model == 0:
        return num_classes
    if CLASS_MULTIPLE % model:
        raise ValueError(f"{num_classes} classes do not split over mesh.model={model} devices "
                         f"and {model} does not divide {CLASS_MULTIPLE}; choose a mesh.model "
                         f"that divides {CLASS_MULTIPLE} or the number of classes")
    return pad_to_multiple(num_classes)


def pad_to_multiple(num_classes: int) -> int:
    """num_classes rounded up to a multiple of CLASS_MULTIPLE."""
    return -(-num_classes // CLASS_MULTIPLE) * CLASS_MULTIPLE


def check_class_split(columns: int, mesh: Mesh) -> None:
    """Raises unless the head's columns split evenly over the mesh's `model` devices."""
    model = mesh.shape[MODEL_AXIS]
    if columns % model:
        raise ValueError(f"a head of {columns} columns does not split evenly over "
                         f"mesh.model={model} devices; choose a mesh.model that divides "
                         f"{columns}")


def barrier(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process reaches `name`, through the coordination service.

    No device collective is involved: gloo sets up each communicator at its first collective and
    waits only 30 s for the other processes, so a barrier made of a collective would time out
    behind a slow compile just the same.
    """
    if jax.process_count() > 1:
        from jax._src import distributed  # the client is not exported publicly

        distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)


# The train state's class weights, by the end of their path in the state or its variables.
_CLASS_WEIGHTS = ("['classifier']['kernel']", "['classifier']['bias']")


def state_sharding(path: tuple, leaf: jax.ShapeDtypeStruct, mesh: Mesh) -> NamedSharding:
    """The classifier's kernel and bias, and their optimizer moments, split by class over `model`
    (no device holds every class); everything else replicated (the backbone is data parallel)."""
    if leaf.ndim and jax.tree_util.keystr(path).endswith(_CLASS_WEIGHTS):
        return class_sharding(mesh, leaf.ndim)
    return replicated(mesh)
