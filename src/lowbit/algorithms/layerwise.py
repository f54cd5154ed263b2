"""Layer-by-layer quantization straight from a checkpoint's safetensors files.

1. Build the model on the meta device; give real storage only to what lies outside the decoder layers.
2. Run the calibration batches up to the first decoder layer and keep its inputs (hidden states and the
   keyword arguments the model passes: rotary embeddings, masks, positions).
3. For each decoder layer: load it, quantize and calibrate it on its inputs, write it out, and replace its
   inputs by its quantized outputs, which become the next layer's inputs. Peak memory is one layer plus
   the calibration activations, whatever the depth of the model.

Resuming replays the finished layers from OUTPUT.partial (forward only) to rebuild the activations.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.algorithms.calibrate import (
    LayerInfo,
    StageInputsSeen,
    calibrate_layer,
    needs_data,
    reads_inputs_again,
    reference_pass,
    stopping_after,
)
from lowbit.checkpoint.load import load_quantizer_stats
from lowbit.checkpoint.store import CheckpointWriter
from lowbit.errors import LowbitError
from lowbit.models.conv1d import linearize, transposed
from lowbit.models.families import Family, resolve_family, to_module_name
from lowbit.models.loading import (
    SafetensorsReader,
    bound_heap,
    build_meta_model,
    check_layout,
    free_memory_bytes,
    load_config,
    load_config_json,
    materialize,
    model_files_for_copy,
    release,
    resolve_model,
    reused_heap,
    trim_heap,
)
from lowbit.models.moe import unfuse_experts
from lowbit.models.vision import Deepstack
from lowbit.quant.convert import check_calibrated, convert, plan, quant_linears, set_calibrating
from lowbit.quant.kv import use_kv_attention
from lowbit.quant.linear import QuantSpec
from lowbit.quant.recipe import Recipe, algorithm_steps, is_sequential, is_true_sequential, spec_to_dict

log = logging.getLogger(__name__)


class _Captured(Exception):
    pass


class _Catcher(nn.Module):
    """Stands in for decoder layer 0: records its inputs and stops the forward. Arguments passed by
    position after hidden_states (GPT-2 and GPT-BigCode pass the cache, mask and encoder states so) are
    recorded under their names in the real layer's forward signature."""

    def __init__(self, layer: nn.Module, passthrough: bool = False) -> None:
        super().__init__()
        self.inputs: list[tuple[Tensor, dict[str, Any]]] = []
        self.signature = inspect.signature(layer.forward)
        self.passthrough = passthrough  # record and return the input (a stand-in for a layer before the last)
        self.__dict__["_layer"] = layer  # not a submodule: the model reads its attributes (block_type)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_layer"], name)

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if args:
            try:
                bound = self.signature.bind_partial(hidden_states, *args)
            except TypeError:
                raise LowbitError(
                    f"the decoder layer takes {len(args)} positional arguments after hidden_states that its "
                    "forward signature does not name; this architecture is not supported"
                ) from None
            named = dict(list(bound.arguments.items())[1:])
            if any(p.kind is p.VAR_POSITIONAL for p in self.signature.parameters.values() if p.name in named):
                raise LowbitError("decoder layers with *args after hidden_states are not supported")
            kwargs = {**named, **kwargs}
        self.inputs.append((hidden_states, kwargs))
        if self.passthrough:
            return hidden_states
        raise _Captured


@dataclass
class LayerwiseResult:
    output: Path
    algorithm: str
    seconds: float
    modules: dict[str, Any] = field(default_factory=dict)


def fingerprint(
    model_dir: Path, recipe: Recipe, calib: Tensor, images: list[dict[str, Tensor]] | None = None
) -> dict[str, Any]:
    h = hashlib.sha256(calib.numpy().tobytes())
    for sample in images or []:
        for key in sorted(sample):
            h.update(sample[key].contiguous().view(torch.uint8).numpy().tobytes())
    digest = h.hexdigest()[:16]
    return {
        "model": str(model_dir.resolve()),
        "recipe": recipe.to_dict(),
        "calib_sha256": digest,
        "calib_shape": list(calib.shape),
    }


CPU_BATCH_TOKENS = 2048  # enough rows for efficient CPU matmuls; more only raises peak memory


def auto_batch_size(
    n_samples: int, seq_len: int, hidden: int, intermediate: int, device: torch.device
) -> int:
    """Calibration batch: layer-forward temporaries within a quarter of free memory, at most 64 samples;
    on CPU also at most CPU_BATCH_TOKENS tokens, since bigger batches there cost memory and gain no speed."""
    per_sample = seq_len * (8 * hidden + 3 * intermediate) * 4
    fit = int(free_memory_bytes(device) * 0.25 // max(per_sample, 1))
    if device.type == "cpu":
        fit = min(fit, CPU_BATCH_TOKENS // seq_len)
    return max(1, min(64, n_samples, fit))


@dataclass
class _Job:
    """Everything one layer-by-layer run works on."""

    model_dir: Path
    config: Any
    reader: SafetensorsReader
    recipe: Recipe
    algorithm: str
    meta: nn.Module
    layers: nn.ModuleList
    layers_path: str
    writer: CheckpointWriter
    device: torch.device
    compute_dtype: torch.dtype
    progress: bool
    uses_data: bool  # False: every layer calibrates from its weights alone (no forward passes at all)
    family: Family
    layer_kwargs: list[list[dict[str, Any]]] | None = None  # per layer, per batch (Family.per_layer_kwargs)
    conv1d: set[str] = field(default_factory=set)  # Conv1D modules made Linears (stored transposed back)
    images: list[dict[str, Tensor]] = field(default_factory=list)  # image + text samples, a batch each
    # per batch: what the model adds to the hidden states after some layers (Qwen3-VL's deepstack features)
    injections: list[Deepstack | None] = field(default_factory=list)
    matmul_dtype: torch.dtype | None = None  # autocast dtype of the layers' forward passes (None: compute_dtype)

    def forwards(self) -> contextlib.AbstractContextManager[Any]:
        """The context of every calibration forward pass of a layer (not of the algorithms' own arithmetic)."""
        if self.matmul_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.matmul_dtype)


def quantize_checkpoint(
    model: str | Path,
    recipe: Recipe,
    output: Path,
    calib: Tensor,
    *,
    device: torch.device | str = "cpu",
    batch_size: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    compute_dtype: torch.dtype = torch.float32,
    progress: bool = True,
    images: list[dict[str, Tensor]] | None = None,
) -> LayerwiseResult:
    """Quantize the checkpoint at `model` with `recipe`, calibrating on `calib` (n, seq_len) token ids and,
    for a vision-language model, on `images`: image + text samples (models.vision.image_samples), one batch
    each.

    Everything that can be checked without the weights (paths, architecture, every Linear's shape, token
    ids) is checked before OUTPUT.partial is created; a bad-input error later removes this run's partial
    output, while a crash keeps it for --resume.
    """
    start = time.perf_counter()
    bound_heap()
    model_dir = resolve_model(str(model))
    config = load_config(model_dir)
    vocab = config.get_text_config().vocab_size  # a vision-language model's is its language model's
    if int(calib.max()) >= vocab:
        raise LowbitError(
            f"calibration token id {int(calib.max())} >= vocab_size {vocab}; "
            "the tokenizer does not match the model"
        )
    algorithm = recipe.algorithm
    meta = build_meta_model(config)
    fam = resolve_family(config, meta)
    check_layout(config, known=fam.moe is not None or bool(fam.renames))
    unfuse_experts(meta, fam)  # one Linear per expert projection, named as the checkpoint names them
    conv1d = linearize(meta)  # GPT-2's Conv1D: Linears while lowbit works, stored as the checkpoint has them
    reader = SafetensorsReader(
        model_dir, rename=lambda n: to_module_name(n, fam), transpose={f"{m}.weight" for m in conv1d}
    )
    layers_path = fam.layers
    layers = meta.get_submodule(layers_path)
    if not isinstance(layers, nn.ModuleList):
        raise LowbitError(
            f"{layers_path} of {config.model_type} is not a layer list; lowbit's facts for it are wrong"
        )
    specs = plan(meta, recipe)  # checks every shape
    if not specs and recipe.rules:
        raise LowbitError(
            f"recipe {recipe.name!r} matches no Linear layer of {config.model_type}; check the recipe's patterns "
            "and --exclude"
        )
    outside = [n for n in specs if not n.startswith(layers_path + ".")]
    if outside:
        raise LowbitError(
            f"{outside[0]} lies outside the decoder layers, which lowbit quantizes one at a time; "
            f"--exclude '{outside[0]}'"
        )
    writer = CheckpointWriter(
        output, fingerprint(model_dir, recipe, calib, images), resume=resume, overwrite=overwrite
    )
    uses_data = needs_data(algorithm) or _static_activations(specs.values(), recipe) or bool(images)
    dev = torch.device(device)
    stored = next((p.dtype for p in layers.parameters() if p.is_floating_point()), compute_dtype)
    job = _Job(model_dir, config, reader, recipe, algorithm, meta, layers, layers_path, writer,
               dev, compute_dtype, progress, uses_data, fam, conv1d=conv1d, images=images or [],
               matmul_dtype=matmul_dtype(recipe.params.calib_dtype, stored, dev))  # fmt: skip
    try:
        modules = _run(job, calib, batch_size)
    except LowbitError:
        writer.abandon()
        raise
    return LayerwiseResult(job.writer.output, algorithm, time.perf_counter() - start, modules)


def _run(job: _Job, calib: Tensor, batch_size: int | None) -> dict[str, Any]:
    config, path = job.config, job.layers_path
    if job.recipe.kv_cache is not None:
        use_kv_attention(job.meta.config)  # type: ignore[arg-type]
    done = job.writer.layers_done
    if done == 0:  # the shell is copied as stored; only what runs before layer 0 is materialized
        shell = [n for n in job.reader.names() if not n.startswith(path + ".")]
        job.writer.write_shell(job.reader.read(shell))
    states = _layer0_inputs(job, calib, batch_size) if job.uses_data else []
    text = config.get_text_config()
    info = LayerInfo("", job.family, getattr(text, "num_attention_heads", None),
                     getattr(text, "num_key_value_heads", None))  # fmt: skip
    modules: dict[str, Any] = {}
    errors: dict[str, Any] = dict(job.writer.progress_extra.get("errors", {}))
    bar = tqdm(range(len(job.layers)), desc="layers", unit="layer", disable=not job.progress)
    sequential = is_sequential(job.recipe.params, job.algorithm)
    # GPTAQ: the float model's activations beside the quantized model's (the same tensors before layer 0)
    reference = list(states) if _asymmetric(job, done) else None
    for i in bar:
        prefix, layer = f"{path}.{i}", job.layers[i]
        last = i + 1 == len(job.layers)
        following: _FloatOutputs | None = None
        orig_dtypes = {k: v.dtype for k, v in layer.state_dict().items()}
        if job.layer_kwargs is not None and states:  # this layer's own masks / arguments
            states[:] = [(h, kw) for (h, _), kw in zip(states, job.layer_kwargs[i], strict=True)]
        if i < done:
            bar.set_postfix_str(f"replaying {prefix}")
            specs = _replay_layer(job, layer, i)
        else:
            bar.set_postfix_str(f"calibrating {prefix}")
            materialize(layer, job.reader, prefix, job.meta, job.device, job.compute_dtype)
            specs = convert(layer, job.recipe, prefix)
            _check_activations(states, prefix)
            info.prefix, info.storage_dtypes = prefix, orig_dtypes
            if job.uses_data and not sequential and not last:
                following = _FloatOutputs(not reads_inputs_again(layer, info, job.algorithm, job.recipe.params))
            reference_out: list[Tensor] = []
            loop = _loop_over(states, following, job.forwards, reference, reference_out) if job.uses_data else None
            errors.update(calibrate_layer(layer, info, job.algorithm, job.recipe.params, loop))
            if reference is not None and not last:
                reference[:] = [(out, kw) for out, (_, kw) in zip(reference_out, states, strict=True)]
                _inject(job, reference, i)
            del reference_out
        modules.update({name: spec_to_dict(spec) for name, spec in specs.items()})
        if i >= done:
            state = layer.state_dict()
            weights = {
                f"{prefix}.{k}": v.to(orig_dtypes[k]) for k, v in state.items() if "_quantizer." not in k
            }
            stats = {f"{prefix}.{k}": v for k, v in state.items() if "_quantizer." in k}
            job.writer.write_layer(i, transposed(weights, job.conv1d), stats, extra={"errors": errors})
            del state, weights, stats
        if job.uses_data and not sequential and not last:  # the next layer reads this one's float outputs
            if following is not None and following.done:
                if not following.in_place:
                    states[:] = [(out, kw) for out, (_, kw) in zip(following.outputs, states, strict=True)]
            else:  # a replayed layer: its float weights, as when it was calibrated
                set_calibrating(layer, True)
                _advance(layer, states, job.forwards)
                set_calibrating(layer, False)
            _inject(job, states, i)
        for _, linear in quant_linears(layer):
            linear.bake()  # the float weights are on disk: advance with one copy of the layer
        if job.uses_data and sequential and not last:
            _advance(layer, states, job.forwards)
            _inject(job, states, i)
        layer.to("meta")
        trim_heap()
    bar.close()

    manifest = {
        "lowbit_version": __version__,
        "source_model": str(job.model_dir),
        "model_type": config.model_type,
        "recipe": job.recipe.to_dict(),
        "algorithm_requested": job.recipe.algorithm,
        "algorithm": job.algorithm,
        "calibration_data_used": job.uses_data,
        "calibration_matmul_dtype": str(job.matmul_dtype or job.compute_dtype).removeprefix("torch."),
        "calibration_sequential": job.uses_data and is_sequential(job.recipe.params, job.algorithm),
        "gptq_true_sequential": bool(algorithm_steps(job.algorithm) & {"gptq", "gptaq"})
        and is_true_sequential(job.recipe.params, job.algorithm),
        "errors": errors,
        "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                        "image_samples": len(job.images), "sha256": job.writer.fingerprint["calib_sha256"]},
        "layers": path,
        "num_layers": len(job.layers),
        "modules": modules,
    }  # fmt: skip
    job.writer.finish(manifest, load_config_json(job.model_dir), model_files_for_copy(job.model_dir))
    return modules


def _layer0_inputs(job: _Job, calib: Tensor, batch_size: int | None) -> list[tuple[Tensor, dict[str, Any]]]:
    """Run the calibration batches through everything before the first decoder layer; keep its inputs."""
    config, path = job.config, job.layers_path
    head = _output_head_name(job.meta)
    # stored dtype; the embedding output is cast to the compute dtype (exact for bf16/fp16 -> fp32)
    materialize(job.meta, job.reader, "", job.meta, job.device, skip=[path, *head])
    embed = job.meta.get_input_embeddings()  # type: ignore[operator]
    cast = embed.register_forward_hook(lambda m, args, out: out.to(job.compute_dtype))
    text = config.get_text_config()
    intermediate = getattr(text, "intermediate_size", None) or 4 * text.hidden_size
    bs = batch_size or auto_batch_size(
        len(calib), calib.shape[1], text.hidden_size, intermediate, job.device
    )
    batches = [{"input_ids": b} for b in calib.split(bs)] + job.images
    owner = job.meta.get_submodule(path.rpartition(".")[0]) if "." in path else job.meta
    with Deepstack.capture(owner) as injections:
        states, job.layer_kwargs = _capture_inputs(
            job.meta, job.layers, batches, job.device, job.family.per_layer_kwargs
        )
    job.injections = injections
    cast.remove()
    log.info("captured %d batches (%d with images) at %s", len(states), len(job.images), path)
    release(job.meta, skip=[path])  # nothing outside the layers is needed past layer 0's inputs
    return states


def _asymmetric(job: _Job, done: int) -> bool:
    """Whether this run keeps the float model's activations for GPTAQ."""
    if "gptaq" not in algorithm_steps(job.algorithm) or not job.uses_data:
        return False
    if not is_sequential(job.recipe.params, job.algorithm):
        log.warning("gptaq with --no-sequential: every layer reads the float model's activations; it is gptq")
        return False
    if done:
        raise LowbitError(
            "--resume cannot rebuild the float model's activations that GPTAQ reads; run again without "
            "--resume (or with --algorithm gptq)"
        )
    return True


def _inject(job: _Job, states: list[tuple[Tensor, dict[str, Any]]], i: int) -> None:
    """Add what the model adds to the hidden states after layer i (Qwen3-VL's deepstack visual features)."""
    for j, injection in enumerate(job.injections):
        if injection is not None:
            states[j] = (injection.apply(states[j][0], i), states[j][1])


def _static_activations(specs: Any, recipe: Recipe) -> bool:
    """Whether some activation quantizer keeps calibrated statistics (dynamic-only formats need no data)."""
    fmts = [s.input for s in specs if isinstance(s, QuantSpec) and s.input is not None]
    if recipe.kv_cache is not None:
        fmts.append(recipe.kv_cache)
    return any(not f.dynamic or f.global_scale for f in fmts)


def _output_head_name(model: nn.Module) -> list[str]:
    """[name of the output projection (lm_head)], which calibration never runs; [] if it is tied."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None  # type: ignore[operator]
    if head is None or head.weight is model.get_input_embeddings().weight:  # type: ignore[operator]
        return []
    return [name for name, m in model.named_modules() if m is head][:1]


@torch.no_grad()
def _capture_inputs(
    meta: nn.Module, layers: nn.ModuleList, batches: list[dict[str, Tensor]], device: torch.device, per_layer: bool
) -> tuple[list[tuple[Tensor, dict[str, Any]]], list[list[dict[str, Any]]] | None]:
    """Layer 0's inputs per batch; with `per_layer` (hybrid models whose layers get different masks) also
    every layer's keyword arguments, recorded by stand-ins that pass the hidden states through."""
    originals = list(layers)
    count = len(layers) if per_layer else 1
    catchers = [_Catcher(originals[i], passthrough=i + 1 < count) for i in range(count)]
    for i, c in enumerate(catchers):
        layers[i] = c
    try:
        for batch in batches:
            try:
                meta(**{k: v.to(device) for k, v in batch.items()}, use_cache=False)
            except _Captured:
                pass
            else:
                raise LowbitError(
                    "the model never called its first decoder layer; its structure is not supported"
                )
    finally:
        for i, layer in enumerate(originals[:count]):
            layers[i] = layer
    if not per_layer:
        return catchers[0].inputs, None
    kwargs = [[kw for _, kw in c.inputs] for c in catchers]
    for i in range(1, len(kwargs)):  # layers given the same arguments as the one before share them
        if all(_same_kwargs(a, b) for a, b in zip(kwargs[i], kwargs[i - 1], strict=True)):
            kwargs[i] = kwargs[i - 1]
    return catchers[0].inputs, kwargs


def _same_kwargs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def same(x: Any, y: Any) -> bool:
        if isinstance(x, Tensor) or isinstance(y, Tensor):
            return isinstance(x, Tensor) and isinstance(y, Tensor) and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, tuple | list) and isinstance(y, tuple | list):
            return len(x) == len(y) and all(same(p, q) for p, q in zip(x, y, strict=True))
        return x is y or (type(x) is type(y) and isinstance(x, int | float | bool | str) and x == y)

    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)


@dataclass
class _FloatOutputs:
    """Not sequential: the float layer's outputs of the statistics pass become the next layer's inputs."""

    in_place: bool  # no later pass reads the inputs: each batch's output replaces its input at once
    outputs: list[Tensor] = field(default_factory=list)  # otherwise kept beside them until the layer is done
    done: bool = False


def _loop_over(
    states: list[tuple[Tensor, dict[str, Any]]],
    following: _FloatOutputs | None = None,
    forwards: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    reference: list[tuple[Tensor, dict[str, Any]]] | None = None,
    reference_out: list[Tensor] | None = None,
) -> Callable[..., None]:
    """The calibration loop over a layer's inputs; the first pass's outputs go to `following` if given. With
    `reference` (GPTAQ: the float model's activations of the same batches), the first pass runs each batch
    of it before the batch itself (`calibrate.reference_pass`) and puts those outputs in `reference_out`;
    a later pass does the same (without keeping the outputs) when called with `reference_again=True`.
    `stop_after`: a later pass that needs only the inputs of the modules up to this one ends each forward
    there (`calibrate.stopping_after`)."""

    def loop(layer: nn.Module, reference_again: bool = False, stop_after: nn.Module | None = None) -> None:
        record = following is not None and not following.done
        first = reference is not None and reference_out is not None and not reference_out
        if stop_after is not None and (record or first):
            raise AssertionError("the first pass keeps the layer's outputs: it runs every forward to the end")
        with reused_heap(), stopping_after(stop_after):
            _loop(layer, record, first or reference_again, first)
        if record:
            assert following is not None
            following.done = True

    def forward(layer: nn.Module, hidden: Tensor, kwargs: dict[str, Any]) -> Any:
        try:
            with forwards():
                return layer(hidden, **kwargs)
        except StageInputsSeen:
            return None

    def _loop(layer: nn.Module, record: bool, pair: bool, keep: bool) -> None:
        for j, (hidden, kwargs) in enumerate(states):
            if pair and reference is not None:
                with reference_pass(layer):
                    ref = forward(layer, reference[j][0], kwargs)
                if keep:
                    assert reference_out is not None
                    reference_out.append((ref[0] if isinstance(ref, tuple) else ref).to(hidden.dtype))
            out = forward(layer, hidden, kwargs)
            if record:
                assert following is not None
                out = (out[0] if isinstance(out, tuple) else out).to(hidden.dtype)
                if following.in_place:
                    states[j] = (out, kwargs)
                else:
                    following.outputs.append(out)

    return loop


@torch.no_grad()
def _advance(
    layer: nn.Module,
    states: list[tuple[Tensor, dict[str, Any]]],
    forwards: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> None:
    """Replace each batch's hidden states by the quantized layer's output."""
    with reused_heap():
        for j, (hidden, kwargs) in enumerate(states):
            with forwards():
                out = layer(hidden, **kwargs)
            states[j] = ((out[0] if isinstance(out, tuple) else out).to(hidden.dtype), kwargs)


def matmul_dtype(choice: str, stored: torch.dtype, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of calibration's forward passes for AlgorithmParams.calib_dtype `choice` (None: fp32).

    "auto" follows the checkpoint: BF16 weights get bf16 products with fp32 accumulation, as the model runs in
    an inference engine, where the hardware has them (CUDA; CPUs with AMX or AVX512-BF16, 5x fp32's speed);
    emulated bf16 would be slower than fp32, and fp16 products can overflow activations that fp32 keeps.
    """
    if choice == "float32":
        return None
    if choice == "bfloat16":
        return torch.bfloat16
    return torch.bfloat16 if stored == torch.bfloat16 and _fast_bf16(device) else None


def _fast_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return device.type == "cpu" and any(callable(p) and p() for p in probes)


def _check_activations(states: list[tuple[Tensor, dict[str, Any]]], prefix: str) -> None:
    for hidden, _ in states:
        # a NaN or Inf makes the sum non-finite; only then (or on an overflowing sum) look element by element
        if not torch.isfinite(hidden.sum()) and not torch.isfinite(hidden).all():
            raise LowbitError(
                f"{prefix}: NaN or Inf in its inputs during calibration; the model overflows "
                "in this dtype or its weights are damaged: check the checkpoint"
            )


def _replay_layer(job: _Job, layer: nn.Module, i: int) -> dict[str, Any]:
    """A finished layer from OUTPUT.partial, quantized as it was written (for --resume)."""
    prefix = f"{job.layers_path}.{i}"
    weights, stats = job.writer.read_layer(i)
    weights = transposed(weights, job.conv1d)
    layer.to_empty(device=job.device)
    layer.load_state_dict({k[len(prefix) + 1 :]: v for k, v in weights.items()}, strict=True)
    layer.to(job.compute_dtype)
    specs = convert(layer, job.recipe, prefix)
    load_quantizer_stats(layer, stats, prefix)
    check_calibrated(layer, prefix)
    return specs
