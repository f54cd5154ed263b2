"""Finding checkpoints, reading their safetensors tensor by tensor, and materializing meta modules.

Layer-by-layer work builds the model on the meta device (no memory), then gives real storage to one
module at a time and fills it from the checkpoint files. Files are opened per read and closed again, so
their memory maps never accumulate in the resident set.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from lowbit.errors import LowbitError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(model: str) -> Path:
    """A local model directory for `model`: a path, or a hub id fetched where the hub is reachable."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LowbitError(
                f"{model}: no config.json in this directory; pass a Hugging Face model directory"
            )
        load_config_json(path)  # a config.json that does not parse is named here, whatever reads it next
        return path
    if path.exists():
        raise LowbitError(f"{model}: is a file, not a model directory; pass the directory with config.json")
    if not HUB_ID.match(model) or model.startswith((".", "/", "~")):
        raise LowbitError(
            f"model path {model!r} does not exist; check the path or pass a hub id like org/name"
        )
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(model, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"])
    except Exception as e:  # offline, unknown repo, gated: all mean "cannot get it from here"
        raise LowbitError(
            f"cannot fetch hub id {model!r} ({type(e).__name__}); download it on a machine with hub access "
            "and pass the local directory"
        ) from None
    return Path(local)


def load_config(model_dir: Path) -> PretrainedConfig:
    if (model_dir / "config.json").is_file():
        load_config_json(model_dir)  # names the line and column where it does not parse
    try:
        return AutoConfig.from_pretrained(model_dir)
    except ValueError as e:
        raise LowbitError(
            f"{model_dir}: transformers does not know this architecture ({str(e).splitlines()[0]})"
        ) from None


CONTEXT_KEYS = ("n_positions", "max_position_embeddings")  # GPT-2 and GPT-BigCode call it n_positions


def max_context(config: PretrainedConfig) -> tuple[str, int] | None:
    """(config key, length): the longest sequence the model's positions cover, from its text config; None
    where the config states none."""
    text = config.get_text_config()
    for key in CONTEXT_KEYS:
        value = getattr(text, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return key, value
    return None


def check_context(config: PretrainedConfig, seq_len: int, flag: str = "--calib-seq-len") -> None:
    """Refuse windows (calibration, or evaluation with `flag` --seq-len) longer than the model's maximum
    context: they only cost time (building and running them grows with the length), and the model was never
    trained on such positions."""
    limit = max_context(config)
    if limit is not None and seq_len > limit[1]:
        key, n = limit
        raise LowbitError(
            f"{flag} {seq_len} exceeds the model's maximum context ({key} {n}); use {flag} {n} or less"
        )


class SafetensorsReader:
    """Tensor name -> file map over a checkpoint's safetensors files (single file or sharded index).

    `rename` maps a stored name to the name the reader shows (the model's module names, where transformers
    renames checkpoint tensors on load); the tensors named in `transpose` (shown names: GPT-2 Conv1D weights,
    read as Linear weights) are transposed."""

    def __init__(
        self, model_dir: Path, files: list[str] | None = None, rename: Callable[[str], str] | None = None,
        transpose: Iterable[str] = (),
    ) -> None:  # fmt: skip
        self.dir = model_dir
        self.transpose = set(transpose)
        index = model_dir / "model.safetensors.index.json"
        if files is not None:
            pass
        elif index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            if not files:
                raise LowbitError(
                    f"{model_dir}: no .safetensors files; lowbit reads safetensors checkpoints only"
                )
        self.file_of: dict[str, str] = {}
        self.stored: dict[str, str] = {}  # shown name -> name in the file, where they differ
        for name in files:
            for key in self._keys(model_dir / name):
                shown = rename(key) if rename is not None else key
                self.file_of[shown] = name
                if shown != key:
                    self.stored[shown] = key

    @staticmethod
    def _keys(path: Path) -> list[str]:
        if not path.is_file():
            raise LowbitError(
                f"{path}: listed in the checkpoint index but missing; re-download the checkpoint"
            )
        try:
            with safe_open(path, "pt") as f:
                return list(f.keys())
        except Exception as e:
            raise LowbitError(
                f"{path}: truncated or corrupt safetensors file ({e}); re-download the checkpoint"
            ) from None

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.file_of if n.startswith(prefix)]

    def read(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        by_file: dict[str, list[str]] = {}
        for n in names:
            if n not in self.file_of:
                raise KeyError(n)
            by_file.setdefault(self.file_of[n], []).append(n)
        out = {}
        for file, keys in by_file.items():
            path = self.dir / file
            try:
                with safe_open(path, "pt") as f:
                    for k in keys:
                        t = f.get_tensor(self.stored.get(k, k))
                        # own the memory: the map closes with the file
                        out[k] = t.t().contiguous() if k in self.transpose else t.clone()
            except Exception as e:
                raise LowbitError(
                    f"{path}: truncated or corrupt safetensors file ({e}); re-download the checkpoint"
                ) from None
        return out


def check_layout(config: PretrainedConfig, known: bool) -> None:
    """lowbit reads checkpoint tensors under the model's module names; refuse, up front, architectures whose
    checkpoints transformers renames or fuses on load (MoE experts stored one by one, fused to 3-D tensors)
    unless lowbit's family facts say how (`known`: renames and per-expert Linears, models/moe.py)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # older transformers: checkpoints are loaded as named
        return
    if not known and get_checkpoint_conversion_mapping(config.model_type):
        from lowbit.models.families import FAMILIES

        moe_types = [t for f in FAMILIES if f.moe is not None for t in f.model_types]
        raise LowbitError(
            f"model type {config.model_type!r}: transformers renames or fuses its checkpoint tensors on load "
            "(MoE experts into 3-D tensors) and lowbit has no facts for it; supported MoE types: "
            f"{', '.join(moe_types)} (an entry in lowbit/models/families.py adds one)"
        )


def auto_model_class(config: PretrainedConfig) -> Any:
    """The transformers auto class that builds a generating model of this config: a causal LM, or for a
    vision-language model (Qwen2.5-VL, Qwen3-VL) the image-text-to-text model holding its language model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        if type(config) in auto._model_mapping:
            return auto
    return AutoModelForCausalLM  # its error names the cause


def build_meta_model(config: PretrainedConfig) -> nn.Module:
    """The full model on the meta device: structure and names, no memory."""
    with torch.device("meta"):
        try:  # eval: no dropout (GPT-2 and Falcon configs have it) in calibration forwards
            return auto_model_class(config).from_config(config, dtype=_config_dtype(config)).eval()
        except ValueError as e:
            raise LowbitError(
                f"cannot build a causal LM for model type {config.model_type!r}: {str(e).splitlines()[0]}"
            ) from None


def _config_dtype(config: PretrainedConfig) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def materialize(
    module: nn.Module,
    reader: SafetensorsReader,
    prefix: str,
    model: nn.Module,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    skip: Iterable[str] = (),
) -> None:
    """Give a meta `module` (named `prefix` in `model`) real storage on `device` and load its tensors.

    Non-persistent buffers (rotary frequencies) are recomputed by the model's own initializer. Tensors
    missing from the checkpoint are an error except tied weights. `skip` names children left on meta.
    """
    skipped = {name: module.get_submodule(name) for name in skip}
    for name in skipped:
        _replace(module, name, nn.Module())
    module.to_empty(device=device)
    init = getattr(model, "_init_weights", None)
    for sub in module.modules():
        if sub._non_persistent_buffers_set and init is not None:
            init(sub)
    state = dict(module.state_dict())
    names = {f"{prefix}.{k}" if prefix else k: k for k in state}
    tensors = reader.read([n for n in names if n in reader.file_of])
    for full, tensor in tensors.items():
        target = state[names[full]]
        if target.shape != tensor.shape:
            raise LowbitError(
                f"{reader.dir}: {full} has shape {tuple(tensor.shape)}, config expects {tuple(target.shape)}"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise LowbitError(
                f"{reader.dir}: {full} holds NaN or Inf; the checkpoint is damaged: re-download or retrain it"
            )
        with torch.no_grad():
            target.copy_(tensor.to(target.dtype))
    missing = [n for n in names if n not in tensors]
    if missing:
        _tie_or_fail(module, model, names, tensors, missing, reader)
    if dtype is not None:
        module.to(dtype)
    for name, sub in skipped.items():
        _replace(module, name, sub)


def release(module: nn.Module, skip: Iterable[str] = ()) -> None:
    """Return `module`'s storage (all but the `skip` children) to the meta device, freeing its memory."""
    skipped = {name: module.get_submodule(name) for name in skip}
    for name in skipped:
        _replace(module, name, nn.Module())
    module.to("meta")
    for name, sub in skipped.items():
        _replace(module, name, sub)
    trim_heap()


M_TRIM_THRESHOLD = -1  # glibc mallopt parameters
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 20
TRIM_THRESHOLD = 128 << 10  # glibc's default


class _Heap:
    bounded = False  # whether this process chose lowbit's allocator bounds (bound_heap)


def bound_heap(threshold: int = MMAP_THRESHOLD) -> None:
    """Serve allocations of `threshold` bytes and more by mmap, returned to the OS when freed. glibc's
    default threshold adapts upwards to the largest freed block, after which layer-sized tensors land in a
    heap that fragments and grows with depth (docs/results.md#memory;
    docs/experiments/2026-11-23-memory-peak-rss-against-depth.md).

    This is a setting of the whole process that glibc cannot undo (its adaptive default is gone once set),
    so only an entry point makes it: `lowbit`'s command line does at start, a Python program may once before
    `quantize_checkpoint`; no library call does."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
        _Heap.bounded = True


# measured (docs/experiments, the 2026-12-02 wall-time entry): 8 MB takes a pydocs-llama SmoothQuant run from
# 12.2 to 7.6 s and keeps the 8-layer synthetic model's fp8 peak (1.07 -> 1.08 GB); 32 MB gave 6.8 s but 1.20 GB
BATCH_HEAP = 8 << 20


@contextlib.contextmanager
def reused_heap(threshold: int = BATCH_HEAP) -> Iterator[None]:
    """Forward passes over calibration batches of one shape allocate the same temporaries batch after batch.
    Inside this block, blocks under `threshold` bytes come from the heap and stay there when freed, so that
    the next batch reuses their pages instead of mapping fresh ones (a page fault per 4 kB, a third of the wall
    time of a SmoothQuant run of a small model); larger blocks stay mapped per use, as outside, so that a wide
    model's layer temporaries do not fragment the heap. On exit the bound is restored and the freed pages go
    back to the OS. In a process that did not bound its heap (`bound_heap`) this does nothing: glibc's
    adaptive defaults could not be restored afterwards."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    if libc is None or not _Heap.bounded:
        yield
        return
    libc.mallopt(M_TRIM_THRESHOLD, threshold)
    libc.mallopt(M_MMAP_THRESHOLD, threshold)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
        libc.malloc_trim(0)


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc keeps them otherwise, inflating the resident set)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _tie_or_fail(
    module: nn.Module,
    model: nn.Module,
    names: dict[str, str],
    loaded: dict[str, torch.Tensor],
    missing: list[str],
    reader: SafetensorsReader,
) -> None:
    """to_empty unties shared parameters: re-tie them (tied embeddings), then require every tensor that the
    checkpoint lacks to share storage with one it has."""
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()
    state = module.state_dict()
    loaded_ptrs = {state[names[n]].data_ptr() for n in loaded}
    for full in missing:
        if state[names[full]].data_ptr() not in loaded_ptrs:
            raise LowbitError(
                f"{reader.dir}: tensor {full} is missing from the checkpoint; the checkpoint does not match its "
                "config.json"
            )


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def env_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise LowbitError("--device cuda was given but no CUDA GPU is visible; use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise LowbitError(f"unknown --device {name!r}; choose auto, cpu or cuda")
    return torch.device(name)


def model_files_for_copy(model_dir: Path) -> list[Path]:
    """Tokenizer and generation files that travel with a checkpoint."""
    wanted = (
        "tokenizer",
        "special_tokens_map",
        "generation_config",
        "vocab",
        "merges",
        "chat_template",
        "preprocessor",
        "processor",
        "video_preprocessor",
    )
    return [
        p
        for p in sorted(model_dir.iterdir())
        if p.is_file() and p.name.startswith(wanted) and p.suffix != ".safetensors"
    ]


def read_json(path: Path) -> Any:
    """The parsed JSON file; a LowbitError naming the file, line and column where it does not parse."""
    try:
        return json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise LowbitError(
            f"{path} is not valid JSON (line {e.lineno} column {e.colno}: {e.msg}); fix or replace the file"
        ) from None
    except UnicodeDecodeError as e:  # json.loads of bytes: not UTF-8 (nor UTF-16/32)
        raise LowbitError(
            f"{path} is not valid JSON (not UTF-8 text at byte {e.start}); fix or replace the file"
        ) from None


def load_config_json(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    config = read_json(path)
    if not isinstance(config, dict):
        raise LowbitError(
            f"{path} holds a JSON {type(config).__name__}, not an object of settings; fix or replace the file"
        )
    return config


TOKENIZER_JSON = ("config.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json")


def load_tokenizer(path: Path) -> Any:
    """The tokenizer stored with a model or checkpoint directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        for name in TOKENIZER_JSON:  # a file that does not parse is the cause: name it
            if (path / name).is_file():
                read_json(path / name)
        raise LowbitError(
            f"{path}: no usable tokenizer ({str(e).splitlines()[0]}); copy the tokenizer files there"
        ) from None
