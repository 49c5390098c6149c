"""Multi-host training: every process (host) runs the same program on its share of the episodes.

Layout: the mesh's "data" axis spans hosts while "fsdp" and "tensor" stay inside one host, so the
params (sharded over fsdp/tensor, replicated over data) have a complete replica on every host.

- Sampling is host-local: each process runs its own SamplingEngine on `local_mesh(mesh)` (its own
  devices) with `local_view(params)`, a zero-copy view of its replica, so processes generate
  independently and never wait for each other mid-collection.
- Episodes: each process runs whole task groups (`my_episodes`), with their global episode indices
  as PRNG identities, so every rollout is the one a single process would sample.
- `gather_rollouts` then gives every process all rollouts in the single-process order: the
  advantages, the minibatch plan and the bucket lengths are computed identically everywhere, and
  each process packs every minibatch whole and hands on the blocks its devices hold to one
  global batch (`global_batch`, jax.make_array_from_callback).
- The update step, the SFT warm start and the orbax checkpoints run on global arrays, called by all
  processes; files are written by process 0 only (RunState.is_main).

With one process every function here is the identity (or plain jax.device_put).
"""

from __future__ import annotations

import hashlib
import pickle

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from loopjax.rollout.batch import Rollout
from loopjax.rollout.records import CollectionSummary


def _process_of(devices_array) -> np.ndarray:
    return np.vectorize(lambda d: d.process_index, otypes=[int])(devices_array)


def local_mesh(mesh: Mesh) -> Mesh:
    """The part of `mesh` on this process's devices (a slice of the "data" axis); `mesh` itself on
    one host. Raises when fsdp or tensor would span hosts: the sampler needs a whole param replica
    on every host."""
    if jax.process_count() == 1:
        return mesh
    owner_DxR = _process_of(mesh.devices).reshape(mesh.shape["data"], -1)
    rows = host_data_rows(owner_DxR, jax.process_index(), jax.local_device_count(),
                          dict(mesh.shape))
    return Mesh(mesh.devices[rows], mesh.axis_names)


def host_data_rows(owner_DxR: np.ndarray, process: int, per_host: int, shape: dict) -> np.ndarray:
    """The "data" indices of `process`, from the process owning each device of the mesh (rows:
    data index; columns: the fsdp x tensor devices of that index)."""
    if np.any(owner_DxR != owner_DxR[:, :1]):
        n = int(owner_DxR.max()) + 1
        raise ValueError(
            f"mesh {shape}: the fsdp x tensor = {owner_DxR.shape[1]} devices of a 'data' index "
            f"span several hosts ({per_host} devices each). Multi-host runs span the {n} hosts "
            f"with the 'data' axis and keep fsdp and tensor inside a host: use --mesh "
            f"{n}*k,fsdp,tensor with k x fsdp x tensor = {per_host}, e.g. --mesh {n},-1,1 or "
            f"--mesh {n},1,{per_host}")
    rows = np.flatnonzero(owner_DxR[:, 0] == process)
    if len(rows) * owner_DxR.shape[1] != per_host or np.any(np.diff(rows) != 1):
        raise ValueError(f"mesh {shape}: the {per_host} devices of process {process} are not one "
                         "contiguous block of the 'data' axis; build the mesh with "
                         "loopjax.sharding.make_mesh (devices ordered by process)")
    return rows


def local_view(tree, mesh_local: Mesh):
    """`tree`'s global arrays as arrays on `mesh_local`, sharing this host's buffers (no copy)."""
    if jax.process_count() == 1:
        return tree

    def view(x):
        spec = x.sharding.spec if isinstance(x.sharding, NamedSharding) else None
        if spec is None or any("data" in np.atleast_1d(a) for a in spec if a is not None):
            raise ValueError(f"cannot view an array sharded as {x.sharding} on one host: params "
                             "must be NamedSharding-ed and replicated over the 'data' axis")
        by_device = {s.device: s.data for s in x.addressable_shards}
        shards = [by_device[d] for d in mesh_local.devices.flat]
        return jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(mesh_local, spec), shards)

    return jax.tree.map(view, tree)


def my_episodes(groups) -> list[int]:
    """Indices of the episodes this process runs: the groups (tasks) split into process_count
    contiguous blocks, so a group's rollouts (one leave-one-out baseline) stay on one host."""
    if jax.process_count() == 1:
        return list(range(len(groups)))
    blocks = np.array_split(np.array(sorted(set(groups)), dtype=int), jax.process_count())
    mine = set(blocks[jax.process_index()].tolist())
    return [i for i, g in enumerate(groups) if g in mine]


def allgather_objects(obj) -> list:
    """[obj of process 0, obj of process 1, ...] on every process (pickled, gathered on device)."""
    if jax.process_count() == 1:
        return [obj]
    data_N = np.frombuffer(pickle.dumps(obj), np.uint8)
    sizes_P = np.asarray(multihost_utils.process_allgather(np.array([data_N.size], np.int32)))[:, 0]
    # Power-of-two padding: the gather compiles once per size bucket, not once per call.
    padded_N = np.zeros(1 << int(sizes_P.max() - 1).bit_length(), np.uint8)
    padded_N[:data_N.size] = data_N
    rows_PxN = np.asarray(multihost_utils.process_allgather(padded_N))
    return [pickle.loads(rows_PxN[p, :n].tobytes()) for p, n in enumerate(sizes_P)]


def gather_rollouts(records: list[Rollout], summary: CollectionSummary
                    ) -> tuple[list[Rollout], CollectionSummary]:
    """Every process's rollouts, in global episode order, and their collection summaries merged
    (`CollectionSummary.merged`)."""
    if jax.process_count() == 1:
        return records, summary
    parts = allgather_objects((records, summary))
    records = sorted((r for recs, _ in parts for r in recs), key=lambda r: r.index)
    return records, CollectionSummary.merged([s for _, s in parts])


def barrier(name: str) -> None:
    """Every process waits here until all arrive (nothing to do on one host)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def check_same(what: str, value: str) -> None:
    """Raises unless every process has the same `value` (e.g. a tokenizer built on each host)."""
    if jax.process_count() == 1:
        return
    digest = np.frombuffer(hashlib.sha256(value.encode()).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if np.any(digests != digests[:1]):
        differ = [p for p in range(len(digests)) if np.any(digests[p] != digests[0])]
        raise ValueError(f"{what} differs between processes (0 vs {differ}); every host must build "
                         "or load the same one (clear stale run folders on the other hosts)")


def global_batch(batch, shardings):
    """A global batch (a pytree of arrays, `shardings` alike) from `batch`, which every process
    holds whole: each process hands on the blocks its own devices hold. On one host this is
    jax.device_put."""
    if jax.process_count() == 1:
        return jax.device_put(batch, shardings)
    return jax.tree.map(lambda x, s: jax.make_array_from_callback(x.shape, s, lambda i: x[i]),
                        batch, shardings)


def fingerprint(tokenizer, model_config) -> str:
    """What must agree between hosts that built their policy themselves."""
    probe = "def f(x):\n    return apis.supervisor.complete_task(answer=x)  # 42 émoji\n"
    return f"{model_config!r} {tokenizer.vocab_size} {list(tokenizer.encode(probe))}"
