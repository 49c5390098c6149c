"""The device mesh, the ONE partition-rules table, and multi-host start-up.

Mesh axes: "data" (pure data parallel: params replicated), "fsdp" (data parallel with params,
gradients and optimizer state sharded), "tensor" (heads / MLP width split across devices).
Batches shard their row axis over ("data", "fsdp").
"""

from __future__ import annotations

import logging
import os
import re

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

AXES = ("data", "fsdp", "tensor")

_IN_PROJ = r"(q_proj|k_proj|v_proj|gate_proj|up_proj)"
_OUT_PROJ = r"(o_proj|down_proj)"

# Param path regex (searched against "a/b/c" paths, so optimizer-state paths such as
# "0/mu/layers/q_proj/kernel" match too) -> PartitionSpec. The first match wins; a leaf that
# matches nothing raises, so a new parameter cannot silently end up replicated.
PARTITION_RULES: tuple[tuple[str, P], ...] = (
    # base weights (layer-stacked tensors have a leading, unsharded L axis)
    (r"(^|/)embed$", P("tensor", "fsdp")),  # V x D
    (r"(^|/)unembed$", P("fsdp", "tensor")),  # D x V
    (r"(^|/)final_norm$", P(None)),
    (r"layers/(attn_norm|mlp_norm|q_norm|k_norm)$", P(None, None)),
    (rf"layers/{_IN_PROJ}/kernel$", P(None, "fsdp", "tensor")),  # L x D x out
    (rf"layers/{_IN_PROJ}/bias$", P(None, "tensor")),
    (rf"layers/{_OUT_PROJ}/kernel$", P(None, "tensor", "fsdp")),  # L x in x D
    # LoRA adapters: a is L x in x r, b is L x r x out; the rank axis is never split
    (rf"(^|/){_IN_PROJ}/a$", P(None, "fsdp", None)),
    (rf"(^|/){_IN_PROJ}/b$", P(None, None, "tensor")),
    (rf"(^|/){_OUT_PROJ}/a$", P(None, "tensor", None)),
    (rf"(^|/){_OUT_PROJ}/b$", P(None, None, "fsdp")),
)


def warn_cached_cpu_collectives(mesh: Mesh) -> bool:
    """Warns (and returns True) when JAX's persistent compilation cache is on for a mesh of several
    CPU devices. XLA:CPU executables read back from that cache (jaxlib 0.10.2) do not keep their
    collectives in one order across devices and can hang until XLA aborts the process
    (tests/conftest.py has the measurements); unset JAX_COMPILATION_CACHE_DIR for such runs. Only
    XLA:CPU was seen to do this."""
    on = (mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
          and bool(jax.config.jax_enable_compilation_cache)
          and bool(jax.config.jax_compilation_cache_dir))
    if on:
        log.warning(
            "the persistent compilation cache (%s) is on and the mesh spans %d CPU devices: "
            "XLA:CPU programs read back from it can hang in their collectives; unset "
            "JAX_COMPILATION_CACHE_DIR for this run", jax.config.jax_compilation_cache_dir,
            mesh.devices.size)
    return on


def make_mesh(spec: str | tuple[int, ...] = "1,-1,1", devices=None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh from a spec like "1,-1,1" (-1 = all remaining devices).

    Devices are ordered by process, so with several hosts each host's devices form a block of the
    leading "data" axis (what loopjax.multihost needs); on one host the order is jax.devices().
    """
    if devices is None:
        devices = sorted(jax.devices(), key=lambda d: d.process_index)  # stable: keeps ids in order
    devices = list(devices)
    n = len(devices)
    if isinstance(spec, str):
        try:
            dims = [int(x) for x in spec.split(",")]
        except ValueError as err:
            raise ValueError(f"mesh spec {spec!r} must be three comma-separated ints, "
                             "e.g. '1,-1,1'") from err
    else:
        dims = list(spec)
    if len(dims) != 3 or dims.count(-1) > 1 or any(d == 0 or d < -1 for d in dims):
        raise ValueError(f"mesh spec {spec!r} must be three positive ints (data,fsdp,tensor), "
                         "at most one of them -1")
    known = int(np.prod([d for d in dims if d != -1]))
    if -1 in dims:
        if n % known:
            raise ValueError(f"mesh spec {spec!r}: {n} devices do not divide by {known}")
        dims[dims.index(-1)] = n // known
    if int(np.prod(dims)) != n:
        raise ValueError(f"mesh spec {spec!r} = {tuple(dims)} needs {int(np.prod(dims))} devices, "
                         f"but there are {n}; use -1 for one axis to take the rest")
    return Mesh(np.asarray(devices).reshape(dims), AXES)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(path) -> str:
    return "/".join(_key_name(k) for k in path)


def spec_for(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The rules-table spec of one leaf; axes that do not divide the dimension are dropped."""
    if len(shape) == 0:
        return P()  # scalars: optimizer step counts and the like
    for pattern, spec in PARTITION_RULES:  # noqa: B007 (the matched rule's, used below)
        if re.search(pattern, path):
            break
    else:
        raise ValueError(f"no partition rule matches parameter {path!r} (shape {shape}); "
                         "add one to loopjax.sharding.PARTITION_RULES")
    if len(spec) != len(shape):
        raise ValueError(f"rule {pattern!r} has {len(spec)} axes but {path!r} has shape {shape}")
    fitted = []
    for dim, axis in zip(shape, spec, strict=True):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        # A dimension that does not divide (say 2 kv heads over 4 tensor devices) stays whole.
        fitted.append(axis if dim % size == 0 else None)
    return P(*fitted)


def param_shardings(mesh: Mesh, tree):
    """NamedSharding for every leaf of a params / LoRA / optimizer-state pytree (arrays or
    shapes)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), tuple(x.shape), mesh)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows of [B, ...] batch arrays split over the data-parallel axes."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def microbatch_sharding(mesh: Mesh) -> NamedSharding:
    """Microbatch-major [U, rows, ...] arrays (loopjax.rollout.Batch): each microbatch's rows
    split over the data-parallel axes."""
    return NamedSharding(mesh, P(None, ("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return mesh.shape["data"] * mesh.shape["fsdp"]


def initialize_distributed(enabled: bool = False, **kwargs) -> dict:
    """Calls jax.distributed.initialize() (multi-host) when asked; logs who and where we are.

    kwargs go to jax.distributed.initialize (coordinator_address, num_processes, process_id);
    on Cloud TPU they are discovered automatically. Elsewhere (CPU or GPU hosts) set the
    environment variables JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; JAX reads the first itself, the other two are read here. On CPU, JAX's default
    cross-process collectives (gloo) carry the all-reduces.
    """
    if enabled:
        for arg, var in (("num_processes", "JAX_NUM_PROCESSES"), ("process_id", "JAX_PROCESS_ID")):
            if os.environ.get(var):
                kwargs.setdefault(arg, int(os.environ[var]))
        jax.distributed.initialize(**kwargs)
    info = dict(process_index=jax.process_index(), process_count=jax.process_count(),
                local_devices=jax.local_device_count(), global_devices=jax.device_count(),
                platform=jax.devices()[0].platform)
    log.info("jax process %(process_index)d/%(process_count)d: %(local_devices)d local of "
             "%(global_devices)d global %(platform)s devices", info)
    return info
