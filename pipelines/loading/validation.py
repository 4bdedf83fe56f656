"""What every load checks before anything runs, in one place.

Weight files, single-file bases, official formats, diffusers folders, converted folders and every
`from_pretrained` go through these checks, so a crafted or damaged file ends in one `CheckpointError`
naming the file, what was wrong and what is expected, instead of a random layer, a NaN image or an
allocator error from deep inside torch:

- tensors: floating point (fp32/fp16/bf16) and finite; the only integer tensors accepted are the
  index buffers official checkpoints carry beside their weights (never loaded as weights);
- diffusers/transformers component folders: before any weight is allocated, from config.json and the
  safetensors headers, config values in sane ranges, float dtypes and the weights' size against the
  memory free for them (pickle-based `.bin` components are refused: safetensors only); after loading,
  the library's own report must list no missing, unexpected or mis-shaped weight, and all are finite;
- pipeline folders: `model_index.json` names only known components of known libraries (no custom
  code is ever imported), each resolved inside the folder (no absolute or `..` names, no symlink out).
"""

from __future__ import annotations

import importlib
import json
import math
import os
import re
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from .files import CheckpointError

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Integer buffers that official checkpoints store beside the weights (recomputed or ignored at load).
INDEX_BUFFER_SUFFIXES = ("relative_position_index", "position_ids")
# Config integers whose name says they size a layer: beyond this they are a crafted or broken config.
SIZE_KEY = re.compile(r"(channels|_dim$|dims|layers|heads|_size$|embeddings|groups|vocab)")
MAX_CONFIG_SIZE = 1 << 20
# Config integers that count layers or blocks: real models have tens; thousands only build slowly into nothing.
LAYER_KEY = re.compile(r"(layers|depths?$|_blocks$)")
MAX_LAYERS = 1000
# Config integers that a layer divides by: 0 or negative fails deep inside a constructor or at the first call.
DIVISOR_KEYS = ("norm_num_groups", "attention_head_dim", "num_attention_heads", "num_heads", "patch_size", "heads")
SCHEDULER_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow_prediction")
MAX_TRAIN_TIMESTEPS = 100_000
MAX_TOKENIZER_LENGTH = 1 << 16
# Where model_index.json may point: these libraries, and this package's own component classes.
ALLOWED_LIBRARIES = ("diffusers", "transformers")
OWN_LIBRARY = "onestep_sr"
WEIGHT_FILE_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_COMPONENT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ---------------------------------------------------------------------------- tensors


def check_tensors(state: Any, source: Any, prefix: str = "", after_each: Any = None) -> None:
    """Every tensor in a (nested) state: floating point of a supported dtype, and finite. `after_each(tensor)` runs
    once a tensor has passed (e.g. to drop its memory-mapped pages from the resident set)."""
    if isinstance(state, torch.Tensor):
        check_tensor(prefix or "<tensor>", state, source)
        if after_each is not None:
            after_each(state)
    elif isinstance(state, Mapping):
        for key, value in state.items():
            check_tensors(value, source, f"{prefix}.{key}" if prefix else str(key), after_each)
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            check_tensors(value, source, f"{prefix}[{i}]", after_each)


def check_storage(key: str, tensor: torch.Tensor, source: Any) -> None:
    """The tensor's values lie in its own storage: no broadcast (stride-0) or overlapping view that claims more
    elements than the file holds (a 2 KB pickle of `torch.ones(1).expand(10**7, 10**6)` would otherwise make every
    later pass walk 1e13 elements). Checked from sizes and strides alone, before any value is read."""
    if tensor.numel() == 0 or tensor.device.type == "meta":
        return
    storage = tensor.untyped_storage().nbytes() // tensor.element_size()
    last = tensor.storage_offset() + sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride()))
    if any(st < 0 for st in tensor.stride()) or last >= storage or tensor.numel() > storage:
        raise CheckpointError(
            f"{source}: {key!r} claims {tuple(tensor.shape)} = {tensor.numel():,} values (strides "
            f"{tuple(tensor.stride())}) over a storage of {storage:,}; weights are stored one value per element. "
            "The file is damaged or crafted."
        )


def check_tensor(key: str, tensor: torch.Tensor, source: Any) -> None:
    check_storage(key, tensor, source)
    if not tensor.is_floating_point():
        if key.endswith(INDEX_BUFFER_SUFFIXES) and not tensor.is_complex():
            return
        raise CheckpointError(
            f"{source}: {key!r} is stored as {_dtype_name(tensor.dtype)}; weights must be floating point "
            "(fp32, fp16 or bf16). The file is damaged or not a model checkpoint."
        )
    if tensor.dtype not in FLOAT_DTYPES:
        raise CheckpointError(
            f"{source}: {key!r} is stored as {_dtype_name(tensor.dtype)}; supported weight dtypes are fp32, fp16 "
            "and bf16 (no method here supports fp8 or fp64 storage). Re-save it in one of those."
        )
    if not all_finite(tensor):
        bad = int((~torch.isfinite(tensor)).sum())
        raise CheckpointError(
            f"{source}: {key!r} holds {bad} non-finite value(s) (NaN or Inf) of {tensor.numel()}; "
            "the weights are corrupted (or were saved after a diverged training run)"
        )


FINITE_CHECK_CHUNK = 2**22  # values per exact check: a 4 MiB mask at a time


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN/Inf. Fast path: a finite sum proves it (NaN and Inf propagate through a sum) in one pass with no
    allocation, 5x cheaper than isfinite().all(). The sum stays in the tensor's own dtype (reductions accumulate in
    float32 inside): asking for a float32 result instead cost 9x the time on bf16 weights and, measured at the end
    of a bf16 SD2.1 load, a float32 copy of the largest weight (+0.19 GiB). Only a non-finite sum (NaN/Inf, or an
    fp16 total past 65504) is checked exactly, a chunk at a time."""
    if not tensor.numel():
        return True
    flat = memory_order_flat(tensor)
    if bool(torch.isfinite(flat.sum())):
        return True
    if flat.ndim != 1:
        return bool(torch.isfinite(flat).all())
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(FINITE_CHECK_CHUNK))


def memory_order_flat(tensor: torch.Tensor) -> torch.Tensor:
    """A dense tensor's values as one flat view in memory order (channels-last weights included), so reductions
    over it read memory straight through; a tensor that no view flattens is returned as it is."""
    order = sorted(range(tensor.ndim), key=lambda d: tensor.stride(d), reverse=True)
    permuted = tensor.permute(order)
    return permuted.view(-1) if permuted.is_contiguous() else tensor


def check_module_weights(module: torch.nn.Module, source: Any) -> None:
    """Every floating parameter and buffer of a loaded module is finite (folders diffusers/transformers read)."""
    for key, tensor in module.state_dict(keep_vars=False).items():
        if tensor.device.type == "meta":
            raise CheckpointError(f"{source}: {key!r} was never loaded (the file lacks it)")
        if tensor.is_floating_point() and not all_finite(tensor):
            raise CheckpointError(
                f"{source}: {key!r} holds non-finite values (NaN or Inf) after loading; the weights are corrupted"
            )


def check_pipeline_weights(pipe: Any, source: Any) -> None:
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            check_module_weights(component, f"{source} ({name})")
    check_text_components(pipe, source)


# ---------------------------------------------------------------------------- paths


def inside(root: Path, name: str | os.PathLike, what: str = "component") -> Path:
    """root / name, refused unless it stays inside root (no absolute path, no '..', no symlink pointing out)."""
    text = os.fspath(name)
    if not text or os.path.isabs(text) or any(part == ".." for part in re.split(r"[\\/]", text)):
        raise CheckpointError(f"{root}: {what} {text!r} points outside the folder; only names inside it are allowed")
    path = root / text
    real_root = root.resolve()
    if not path.resolve().is_relative_to(real_root):
        raise CheckpointError(
            f"{root}: {what} {text!r} resolves to {path.resolve()}, outside the folder (a symlink?); "
            "copy the files into the folder instead"
        )
    return path


def check_files_inside(root: Path, folder: Path) -> None:
    real_root = root.resolve()
    for path in folder.rglob("*"):
        if not path.resolve().is_relative_to(real_root):
            raise CheckpointError(f"{path}: a symlink pointing outside {root} ({path.resolve()}); refused")


# ---------------------------------------------------------------------------- configs


def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise CheckpointError(f"{path}: missing") from err
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not a readable JSON file: {err}") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def check_config(config: Mapping[str, Any], source: Any) -> None:
    """Sizes, scaling factors and timestep counts in ranges a real model has."""
    for key, value in config.items():
        if key.startswith("_"):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if SIZE_KEY.search(key):
            for v in values:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v is None:
                    continue
                if not (0 <= v <= MAX_CONFIG_SIZE):
                    raise CheckpointError(
                        f"{source}: config {key}={value!r} is out of range (expected 0..{MAX_CONFIG_SIZE}); "
                        "the config is damaged or crafted"
                    )
        if key in ("scaling_factor", "shift_factor") and value is not None:
            ok = isinstance(value, (int, float)) and math.isfinite(value)
            if key == "scaling_factor":
                ok = ok and value > 0
            if not ok:
                raise CheckpointError(
                    f"{source}: config {key}={value!r}; expected a finite number"
                    + (" > 0 (latents are divided by it)" if key == "scaling_factor" else "")
                )
        if LAYER_KEY.search(key) and any(_is_int(v) and v > MAX_LAYERS for v in values):
            raise CheckpointError(
                f"{source}: config {key}={value!r}: more than {MAX_LAYERS} layers/blocks; real models have tens. "
                "The config is damaged or crafted (building it would take very long and fit no weights)"
            )
        if key in DIVISOR_KEYS and any(_is_int(v) and v < 1 for v in values):
            raise CheckpointError(f"{source}: config {key}={value!r}: must be >= 1 (layers divide by it)")
        if key in ("beta_start", "beta_end") and not (isinstance(value, (int, float)) and 0 < value < 1):
            raise CheckpointError(f"{source}: scheduler {key}={value!r}; expected a number in (0, 1)")
        if key == "trained_betas" and value is not None:
            betas = list(values)
            ok = all(isinstance(b, (int, float)) and 0 < b < 1 for b in betas) and betas == sorted(betas)
            if not ok:
                raise CheckpointError(f"{source}: scheduler trained_betas must rise within (0, 1)")
        if key == "prediction_type" and value not in SCHEDULER_PREDICTION_TYPES:
            raise CheckpointError(
                f"{source}: scheduler prediction_type={value!r}; expected one of {SCHEDULER_PREDICTION_TYPES}"
            )
        if key == "num_train_timesteps" and not (_is_int(value) and 1 <= value <= MAX_TRAIN_TIMESTEPS):
            raise CheckpointError(f"{source}: config num_train_timesteps={value!r}; expected 1..{MAX_TRAIN_TIMESTEPS}")
        if key == "model_max_length" and not (_is_int(value) and 1 <= value <= MAX_TOKENIZER_LENGTH):
            raise CheckpointError(f"{source}: tokenizer model_max_length={value!r}; expected 1..{MAX_TOKENIZER_LENGTH}")
    start, end = config.get("beta_start"), config.get("beta_end")
    if isinstance(start, (int, float)) and isinstance(end, (int, float)) and start > end:
        raise CheckpointError(f"{source}: scheduler beta_start={start} > beta_end={end}; betas must rise")


def check_timestep(value: Any, low: float, high: float, source: Any, inclusive_high: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if inclusive_high else value < high)
    if not ok:
        bracket = "]" if inclusive_high else ")"
        raise CheckpointError(f"{source}: timestep {value!r} is outside the scheduler's range [{low}, {high}{bracket}")


# ---------------------------------------------------------------------------- component folders


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """key -> (dtype name, shape) from a safetensors header, without reading any tensor."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from err


def parameters_implied(model_cls: type, config: Mapping[str, Any], source: Any) -> int:
    """The parameter count a config builds, from a model built on the meta device (nothing allocated)."""
    from diffusers import ModelMixin

    try:
        with torch.device("meta"):
            if issubclass(model_cls, ModelMixin):
                model = model_cls.from_config(dict(config))
            else:
                model = model_cls(model_cls.config_class.from_dict(dict(config)))
    except CheckpointError:
        raise
    except Exception as err:  # a config the constructor rejects is the file's fault
        raise CheckpointError(f"{source}: config.json does not make a valid {model_cls.__name__}: {err}") from err
    return sum(p.numel() for p in model.parameters())


def component_weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a component folder (sharded: every shard of the index); pickles refused."""
    for stem in WEIGHT_FILE_NAMES:
        single = folder / f"{stem}.safetensors"
        if single.is_file():
            return [single]
        index = folder / f"{stem}.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: no 'weight_map' object")
            return [inside(folder, shard, "shard") for shard in sorted(set(map(str, weight_map.values())))]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_COMPONENT_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: weights only in pickle format ({', '.join(pickles)}); pickled components are refused "
            "because unpickling can run code. Convert the folder to safetensors (e.g. load it once in a trusted "
            "environment and save_pretrained(..., safe_serialization=True))."
        )
    raise CheckpointError(f"{folder}: no weights (expected {WEIGHT_FILE_NAMES[0]}.safetensors or model.safetensors)")


def check_model_folder(folder: Path, model_cls: type, dtype: torch.dtype | None = None) -> None:
    """A diffusers/transformers model folder, checked from its config and safetensors headers only (nothing
    allocated; `dtype`: the one it will be loaded in, for the size check)."""
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: missing (expected a {model_cls.__name__} folder)")
    config = read_json(folder / "config.json")
    check_config(config, folder / "config.json")
    size, stored = 0, 0
    for path in component_weight_files(folder):
        for key, (dtype_name, shape) in safetensors_header(path).items():
            if dtype_name not in SAFETENSORS_DTYPES and not key.endswith(INDEX_BUFFER_SUFFIXES):
                raise CheckpointError(
                    f"{path}: {key!r} is stored as {dtype_name}; weights must be fp32, fp16 or bf16 (F32/F16/BF16)"
                )
            size += math.prod(shape) * (dtype or SAFETENSORS_DTYPES.get(dtype_name, torch.float32)).itemsize
            stored += math.prod(shape)
    check_weights_fit(folder, size)
    implied = parameters_implied(model_cls, config, folder)
    if implied > stored * 1.01 + 1024:
        raise CheckpointError(
            f"{folder}: config.json implies {implied:,} parameters but the weights hold {stored:,}; the config does "
            "not belong to these weights (or is crafted), so nothing is built from it"
        )


def check_weights_fit(folder: Path, size: int) -> None:
    """The weights' size (bytes at the target dtype) against the memory free for them (before allocating)."""
    from ..tiling.memory import available_memory, format_bytes

    free = available_memory(torch.device("cpu"))
    if size > free:
        raise CheckpointError(
            f"{folder}: its weights need {format_bytes(size)} but only {format_bytes(free)} of memory is available; "
            "load in a smaller dtype (bf16/fp16), close other programs, or use a machine with more memory"
        )


# ---------------------------------------------------------------------------- pipeline folders


def check_pipeline_folder(folder: str | os.PathLike, pipeline_cls: type) -> tuple[Path, dict[str, type]]:
    """A `from_pretrained` folder of one of our pipelines, checked before diffusers reads any of it; returns the
    folder and each listed component's class (for `load_component`)."""
    root = Path(folder)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder (expected a pipeline folder with model_index.json)")
    index = read_json(root / "model_index.json")
    class_name = index.get("_class_name")
    if class_name != pipeline_cls.__name__:
        raise CheckpointError(f"{root}: model_index.json names {class_name!r}; expected {pipeline_cls.__name__!r}")
    expected = set(pipeline_cls._get_signature_keys(pipeline_cls)[0]) | set(
        getattr(pipeline_cls, "_optional_components", [])
    )
    components: dict[str, type] = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, (list, tuple)):
            continue  # pipeline config values (checked by the pipeline after loading)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) or name not in expected:
            raise CheckpointError(
                f"{root}: model_index.json has a component {name!r}; {pipeline_cls.__name__} has {sorted(expected)}"
            )
        if len(entry) != 2:
            raise CheckpointError(f"{root}: component {name!r} has a malformed entry {entry!r}")
        if list(entry) == [None, None]:  # an optional component left out
            continue
        library, cls_name = entry
        component_cls = resolve_component_class(root, name, library, cls_name)
        check_component_role(root, name, component_cls)
        path = inside(root, name)
        if not path.is_dir():
            raise CheckpointError(f"{root}: component {name!r} is listed in model_index.json but {path} is missing")
        components[name] = component_cls  # its files are checked by load_component
    return root, components


def check_component_role(root: Path, name: str, component_cls: type) -> None:
    """A component's class fits its role (a tokenizer class listed as text_encoder would fail at the first call)."""
    from diffusers import ModelMixin
    from diffusers.configuration_utils import ConfigMixin
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    roles = {
        "text_encoder": (PreTrainedModel, "a transformers model"),
        "tokenizer": (PreTrainedTokenizerBase, "a transformers tokenizer"),
        "scheduler": (ConfigMixin, "a diffusers scheduler"),
        "unet": (ModelMixin, "a diffusers model"),
        "vae": (ModelMixin, "a diffusers model"),
        "transformer": (ModelMixin, "a diffusers model"),
    }
    role = re.sub(r"_\d+$", "", name)
    if role in roles and not issubclass(component_cls, roles[role][0]):
        raise CheckpointError(
            f"{root}: component {name!r} is a {component_cls.__name__}, not {roles[role][1]}; model_index.json is "
            "damaged or crafted"
        )


def check_text_components(pipe: Any, source: Any) -> None:
    """Each tokenizer has an unknown token and no token id beyond its text encoder's vocabulary (either would only
    fail at the first prompt)."""
    for suffix in ("", "_2", "_3"):
        tokenizer, encoder = getattr(pipe, f"tokenizer{suffix}", None), getattr(pipe, f"text_encoder{suffix}", None)
        if tokenizer is None or encoder is None:
            continue
        if getattr(tokenizer, "unk_token", None) is None:
            raise CheckpointError(
                f"{source}: tokenizer{suffix} has no unknown token; text outside its vocabulary fails"
            )
        vocab = getattr(encoder.config, "vocab_size", None)
        if isinstance(vocab, int) and len(tokenizer) > vocab:
            raise CheckpointError(
                f"{source}: tokenizer{suffix} has {len(tokenizer)} tokens but text_encoder{suffix} embeds only "
                f"{vocab}; token ids beyond the vocabulary would fail at the first prompt"
            )


def resolve_component_class(root: Path, name: str, library: Any, cls_name: Any) -> type:
    """The class a model_index.json entry names, only from diffusers, transformers or this package."""
    if not isinstance(library, str) or not isinstance(cls_name, str) or not cls_name.isidentifier():
        raise CheckpointError(f"{root}: component {name!r} has a malformed entry [{library!r}, {cls_name!r}]")
    if library in ALLOWED_LIBRARIES:
        module = importlib.import_module(library)  # already imported: no code from the folder
    elif library == OWN_LIBRARY or library.startswith(OWN_LIBRARY + "."):
        from .. import models

        module = models
    else:
        raise CheckpointError(
            f"{root}: component {name!r} names the library {library!r}; only {ALLOWED_LIBRARIES} and this package's "
            "own classes are loaded (custom code is never imported)"
        )
    component_cls = getattr(module, cls_name, None)
    if not isinstance(component_cls, type):
        raise CheckpointError(f"{root}: component {name!r} names {library}.{cls_name}, which does not exist")
    return component_cls


def check_component(root: Path, path: Path, component_cls: type, dtype: torch.dtype | None = None) -> None:
    from diffusers.configuration_utils import ConfigMixin

    if path.is_dir():
        check_files_inside(root, path)
    if _is_model_class(component_cls):
        check_model_folder(path, component_cls, dtype)
    elif issubclass(component_cls, ConfigMixin):  # schedulers
        for config in path.glob("*.json"):
            check_config(read_json(config), config)
    else:  # tokenizers
        config = path / "tokenizer_config.json"
        if config.is_file():
            data = read_json(config)
            check_config({k: v for k, v in data.items() if k == "model_max_length"}, config)


def _few(keys: list[str], n: int = 5) -> str:
    return ", ".join(repr(k) for k in keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def load_component(
    component_cls: type,
    root: str | os.PathLike,
    subfolder: str | None = None,
    loader: Any = None,
    **kwargs: Any,
) -> Any:
    """component_cls.from_pretrained(root, subfolder=...), offline and safetensors-only, checked before (config,
    dtypes, paths, size) and after: every expected weight loaded and none left over (the library's own loading
    report, so a missing weight is an error, never a random init), all weights finite."""
    root = Path(root)
    path = inside(root, subfolder, "subfolder") if subfolder else root
    if loader is None and getattr(component_cls, "validates_on_load", False):
        return component_cls.from_pretrained(path, **kwargs)  # its from_pretrained calls this function itself
    check_component(root, path, component_cls, kwargs.get("torch_dtype"))
    if loader is None and _is_model_class(component_cls) and set(kwargs) <= {"torch_dtype"}:
        from .lean import lean_load

        try:
            lean = lean_load(component_cls, path, component_weight_files(path), kwargs.get("torch_dtype"))
        except CheckpointError:
            raise
        except Exception as err:  # checked files that still break the build: a damaged config or file
            raise CheckpointError(f"{path}: could not be loaded as a {component_cls.__name__}: {err}") from err
        if lean is not None:
            check_module_weights(lean, path)
            return lean
    loader = loader or component_cls.from_pretrained
    kwargs["local_files_only"] = True
    model = _is_model_class(component_cls)
    if model:
        kwargs.update(use_safetensors=True, output_loading_info=True)
    if subfolder:
        kwargs["subfolder"] = subfolder
    try:
        loaded = loader(root, **kwargs)
    except CheckpointError:
        raise
    except Exception as err:  # checked files that still break the library's loader: a damaged config or file
        raise CheckpointError(f"{path}: could not be loaded as a {component_cls.__name__}: {err}") from err
    if not model:
        return loaded
    component, info = loaded
    problems = [
        f"{what} {len(keys)} weight(s): {_few(sorted(map(str, keys)))}"
        for what, keys in (("missing", info.get("missing_keys")), ("unexpected", info.get("unexpected_keys")))
        if keys
    ]
    mismatched = info.get("mismatched_keys")
    if mismatched:
        problems.append(f"{len(mismatched)} weight(s) of the wrong shape: {_few([str(m) for m in mismatched])}")
    if problems:
        raise CheckpointError(
            f"{path}: the weights do not match its config.json ({'; '.join(problems)}); a {component_cls.__name__} "
            "needs every weight its config implies and no others (a missing one would be randomly initialised)"
        )
    check_module_weights(component, path)
    return component


def _is_model_class(cls: type) -> bool:
    from diffusers import ModelMixin
    from transformers import PreTrainedModel

    return issubclass(cls, (ModelMixin, PreTrainedModel))


def fit_state(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: Any, what: str = "weights", assign: bool = False
) -> None:
    """model.load_state_dict(state) where every key must fit exactly (names and shapes), as a CheckpointError;
    assign=True takes the state's tensors themselves (a model built without storage)."""
    try:
        result = model.load_state_dict(dict(state), strict=False, assign=assign)
    except RuntimeError as err:  # size mismatches
        first = str(err).strip().splitlines()[1:2] or [str(err)]
        raise CheckpointError(f"{source}: the {what} do not fit their model: {first[0].strip()}") from err
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{source}: the {what} do not fit the model read from their shapes: missing "
            f"{_few(list(result.missing_keys))}; unexpected {_few(list(result.unexpected_keys))}"
        )


def build_from_state(build: Any, source: Any, what: str) -> Any:
    """build() of a model whose dims were read from a checkpoint: any failure is the checkpoint's fault."""
    try:
        return build()
    except CheckpointError:
        raise
    except Exception as err:  # dims read from a damaged file can break a constructor in any way
        raise CheckpointError(f"{source}: the {what} dims read from the file do not make a valid model: {err}") from err


@contextmanager
def checkpoint_errors(source: Any, what: str):
    """Inside: any failure other than the project's own errors, memory or interruption is reported as a
    CheckpointError on `source`. Parsers check what they expect; this is the boundary that guarantees a damaged
    file never surfaces as a bare AttributeError/TypeError from deep inside (found by tests/test_fuzz_loaders.py)."""
    try:
        yield
    except (CheckpointError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as err:
        raise CheckpointError(f"{source}: could not be read as {what} ({type(err).__name__}: {err})") from err
