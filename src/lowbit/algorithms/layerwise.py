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
from dataclasses import dataclass, field
from difflib import get_close_matches
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lowbit import __version__
from lowbit.algorithms.calibrate import LayerInfo, calibrate_layer, needs_data, reads_inputs_again
from lowbit.algorithms.layer_inputs import Keep, LayerInputs
from lowbit.checkpoint.load import load_quantizer_stats
from lowbit.checkpoint.store import CheckpointWriter
from lowbit.errors import LowbitError
from lowbit.models.conv1d import linearize, transposed
from lowbit.models.families import Family, resolve_family, to_module_name
from lowbit.models.loading import (
    SafetensorsReader,
    build_meta_model,
    check_context,
    check_layout,
    free_memory_bytes,
    load_config,
    load_config_json,
    materialize,
    model_files_for_copy,
    release,
    resolve_model,
    trim_heap,
)
from lowbit.models.moe import unfuse_experts
from lowbit.models.vision import Deepstack
from lowbit.quant.convert import check_calibrated, convert, plan, quant_linears, set_calibrating
from lowbit.quant.kv import use_kv_attention
from lowbit.quant.linear import QuantSpec
from lowbit.quant.recipe import DEFAULT_SKIPS, Recipe, spec_to_dict
from lowbit.quant.steps import Algorithm

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
    conv1d: set[str] = field(default_factory=set)  # Conv1D modules made Linears (stored transposed back)
    images: list[dict[str, Tensor]] = field(default_factory=list)  # image + text samples, a batch each
    matmul_dtype: torch.dtype | None = None  # autocast dtype of the layers' forward passes (None: compute_dtype)

    @property
    def steps(self) -> Algorithm:
        return Algorithm.parse(self.algorithm)

    @property
    def sequential(self) -> bool:
        """Each layer calibrated on the quantized layers' outputs (else on the float model's)."""
        return self.steps.sequential(self.recipe.params)

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
    model_dir = resolve_model(str(model))
    config = load_config(model_dir)
    check_context(config, calib.shape[-1])
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
    _warn_unmatched_excludes(recipe, meta)
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


def _warn_unmatched_excludes(recipe: Recipe, model: nn.Module) -> None:
    """A warning for each of the user's --exclude globs that matches no module, naming the closest module
    (the default skips need not match)."""
    names = [n for n, _ in model.named_modules() if n]
    for pattern in recipe.skips:
        if pattern not in DEFAULT_SKIPS and not any(fnmatchcase(n, pattern) for n in names):
            closest = get_close_matches(pattern, names, n=1, cutoff=0)
            log.warning("--exclude %r matches no module; closest module name: %s", pattern, closest[0])


def _run(job: _Job, calib: Tensor, batch_size: int | None) -> dict[str, Any]:
    """Every decoder layer in turn: replayed (--resume) or calibrated and written; then the next one's inputs."""
    if job.recipe.kv_cache is not None:
        use_kv_attention(job.meta)
    done = job.writer.layers_done
    if done == 0:  # the shell is copied as stored; only what runs before layer 0 is materialized
        shell = [n for n in job.reader.names() if not n.startswith(job.layers_path + ".")]
        job.writer.write_shell(job.reader.read(shell))
    inputs = _layer0_inputs(job, calib, batch_size) if job.uses_data else None
    if inputs is not None and _asymmetric(job, done):  # GPTAQ: the float model's activations beside
        inputs.reference = list(inputs.hidden)  # (the same tensors before layer 0)
    modules: dict[str, Any] = {}
    errors: dict[str, Any] = dict(job.writer.progress_extra.get("errors", {}))
    bar = tqdm(range(len(job.layers)), desc="layers", unit="layer", disable=not job.progress)
    for i in bar:
        prefix, layer = f"{job.layers_path}.{i}", job.layers[i]
        stored = {k: v.dtype for k, v in layer.state_dict().items()}  # the dtypes the checkpoint has
        if inputs is not None:
            inputs.for_layer(i)
        if i < done:
            bar.set_postfix_str(f"replaying {prefix}")
            specs = _replay_layer(job, layer, i)
        else:
            bar.set_postfix_str(f"calibrating {prefix}")
            specs, report = _calibrate(job, layer, i, stored, inputs)
            errors.update(report)
            _write(job, layer, i, stored, errors)
        modules.update({name: spec_to_dict(spec) for name, spec in specs.items()})
        _advance(job, layer, i, inputs)
        layer.to("meta")
        trim_heap()
    bar.close()
    _finish(job, calib, modules, errors)
    return modules


def _calibrate(
    job: _Job, layer: nn.Module, i: int, stored: dict[str, torch.dtype], inputs: LayerInputs | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Layer i materialized, converted and calibrated on its inputs: ({name: spec}, {name: error report}).
    Its statistics pass keeps what the next layer reads of it: not sequential, the float layer's outputs;
    GPTAQ, the outputs of its reference forwards (which then become the next layer's float activations)."""
    prefix = f"{job.layers_path}.{i}"
    materialize(layer, job.reader, prefix, job.meta, job.device, job.compute_dtype)
    specs = convert(layer, job.recipe, prefix)
    text = job.config.get_text_config()
    info = LayerInfo(prefix, job.family, getattr(text, "num_attention_heads", None),
                     getattr(text, "num_key_value_heads", None), stored)  # fmt: skip
    following = i + 1 < len(job.layers)
    if inputs is None:
        return specs, calibrate_layer(layer, info, job.steps, job.recipe.params, None)
    inputs.check_finite(prefix)
    keep: Keep | None = None
    if following and not job.sequential:  # a later pass reads the inputs: keep the outputs beside them
        keep = "beside" if reads_inputs_again(layer, info, job.steps, job.recipe.params) else "in_place"
    inputs.keep(keep, reference=following)
    report = calibrate_layer(layer, info, job.steps, job.recipe.params, inputs.run, inputs.reducer)
    if following:
        inputs.advance_reference(i)
    return specs, report


def _write(
    job: _Job, layer: nn.Module, i: int, stored: dict[str, torch.dtype], errors: dict[str, Any]
) -> None:
    """Layer i's float weights in their stored dtypes and its quantizers' statistics, with the errors so far."""
    prefix = f"{job.layers_path}.{i}"
    state = layer.state_dict()
    weights = {f"{prefix}.{k}": v.to(stored[k]) for k, v in state.items() if "_quantizer." not in k}
    stats = {f"{prefix}.{k}": v for k, v in state.items() if "_quantizer." in k}
    job.writer.write_layer(i, transposed(weights, job.conv1d), stats, extra={"errors": errors})


def _advance(job: _Job, layer: nn.Module, i: int, inputs: LayerInputs | None) -> None:
    """Bake layer i's fake-quantized weights (its float weights are on disk: one copy of the layer) and give
    the next layer its inputs: not sequential, the float layer's outputs (kept by the statistics pass, or a
    forward of the float weights before baking); sequential, the quantized layer's. Then the deepstack
    features the model adds after layer i."""
    following = inputs if inputs is not None and i + 1 < len(job.layers) else None
    if following is not None and not job.sequential and not following.advance_to_kept():
        set_calibrating(layer, True)  # a replayed layer: its float weights, as when it was calibrated
        following.advance(layer)
        set_calibrating(layer, False)
    for _, linear in quant_linears(layer):
        linear.bake()
    if following is not None and job.sequential:
        following.advance(layer)
    if following is not None:
        following.inject(i)


def _finish(job: _Job, calib: Tensor, modules: dict[str, Any], errors: dict[str, Any]) -> None:
    """lowbit.json, then OUTPUT.partial renamed to OUTPUT."""
    manifest = {
        "lowbit_version": __version__,
        "source_model": str(job.model_dir),
        "model_type": job.config.model_type,
        "recipe": job.recipe.to_dict(),
        "algorithm_requested": job.recipe.algorithm,
        "algorithm": job.algorithm,
        "calibration_data_used": job.uses_data,
        "calibration_matmul_dtype": str(job.matmul_dtype or job.compute_dtype).removeprefix("torch."),
        "calibration_sequential": job.uses_data and job.sequential,
        "gptq_true_sequential": job.steps.gptq and job.steps.true_sequential(job.recipe.params),
        "errors": errors,
        "calibration": {"samples": int(calib.shape[0]), "seq_len": int(calib.shape[1]),
                        "image_samples": len(job.images), "sha256": job.writer.fingerprint["calib_sha256"]},
        "layers": job.layers_path,
        "num_layers": len(job.layers),
        "modules": modules,
    }  # fmt: skip
    job.writer.finish(manifest, load_config_json(job.model_dir), model_files_for_copy(job.model_dir))


def _layer0_inputs(job: _Job, calib: Tensor, batch_size: int | None) -> LayerInputs:
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
        states, per_layer = _capture_inputs(
            job.meta, job.layers, batches, job.device, job.family.per_layer_kwargs
        )
    cast.remove()
    log.info("captured %d batches (%d with images) at %s", len(states), len(job.images), path)
    release(job.meta, skip=[path])  # nothing outside the layers is needed past layer 0's inputs
    hidden, kwargs = [h for h, _ in states], [kw for _, kw in states]
    return LayerInputs(hidden, kwargs, per_layer=per_layer, injections=injections, forwards=job.forwards)


def _asymmetric(job: _Job, done: int) -> bool:
    """Whether this run keeps the float model's activations for GPTAQ."""
    if not job.steps.float_reference or not job.uses_data:
        return False
    if not job.sequential:
        log.warning("gptaq with --no-sequential: every layer reads the float model's activations; it is gptq")
        return False
    if done:
        raise LowbitError(
            "--resume cannot rebuild the float model's activations that GPTAQ reads; run again without "
            "--resume (or with --algorithm gptq)"
        )
    return True


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
