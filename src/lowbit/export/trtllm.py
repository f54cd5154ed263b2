"""TensorRT-LLM checkpoint exporter: config.json + rank{i}.safetensors (../shared/specs/formats.md §7).

Each Linear becomes a `Parts`: its logical tensors (grid values in the weight's own [out, in] shape, scales in
block shape) each tagged with the axes it has ("out", "in"). The tensor-parallel split is then one rule:
column-parallel layers (qkv, fc, gate) split the "out" axis, row-parallel ones (dense, proj) the "in" axis,
and a tensor without that axis (per-tensor scales; per-row scales and biases of row-parallel layers) is
replicated. qkv splits q, k and v each and concatenates the pieces per rank. Shards are encoded to storage
after the split (4-bit packing pairs neighbours), so concatenating the ranks' tensors gives the tp=1 tensor.

Storage per quant_algo (weights `w` [out, in]; per-tensor scales are fp32 of shape [1]):

| quant_algo | weight | weights_scaling_factor | weights_scaling_factor_2 | activation_scaling_factor |
|---|---|---|---|---|
| FP8 | e4m3 [out, in] | amax / 448 | - | amax_x / 448 |
| W8A16 | int8 [out, in] | fp32 [out] = amax_row / 127 | - | - |
| W8A8_SQ_PER_CHANNEL | int8 [out, in] | fp32 [out] | - | amax_x / 127 |
| W4A16_AWQ | int8 [out/2, in] (ModelOpt nibbles, §4) | fp32 [out, in/g] = amax_group / 7 | - | - |
| W4A8_AWQ | as W4A16_AWQ | as W4A16_AWQ | FP8 level amax / 448 | amax_x / 448 |
| NVFP4 | uint8 [out, in/2] | e4m3 [out, in/16] | amax / (6 * 448) | amax_x / (6 * 448) |

INT4 layout: TensorRT-LLM's checkpoint loader (`preprocess_perlayer_weights` in
tensorrt_llm/models/modeling_utils.py) takes the int8 weight [out/2, in] as ModelOpt writes it
(`pack_int4_in_uint8` then `.view(torch.int8)` in modelopt/torch/export/model_config_utils.py), transposes it
itself before `preprocess_weights_for_mixed_gemm(..., torch.quint4x2, ...)`, and transposes the [out, in/g]
group scales too: the file holds the untransposed layout.

lowbit folds AWQ / SmoothQuant scales into the preceding norms, so there is no prequant_scaling_factor,
except for W4A8_AWQ: TensorRT-LLM's loader divides `prequant_scaling_factor` by the activation scale to
quantize the input to FP8, so W4A8_AWQ writes ones (model dtype, [in]) and pre_quant_scale true.

Layers are renumbered from 0 within each pipeline stage, as TensorRT-LLM's own converters do
(`transformer.layers.{l - layers_range[0]}`). Memory: units are read one at a time and every rank file is
streamed (`writer.StreamingSafetensors`), so the peak is one layer whatever the model's size.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lowbit.errors import LowbitError
from lowbit.export.api import ExportOptions
from lowbit.export.codecs import TRTLLM, Codec, codec_for
from lowbit.export.schemes import Scheme, kind
from lowbit.export.source import QLinear, Source, Unit
from lowbit.export.writer import ExportWriter
from lowbit.quant.linear import QuantSpec

log = logging.getLogger(__name__)

DEFAULT_GROUP_SIZE = 128  # TensorRT-LLM's QuantConfig default, written where the format has no groups
LLAMA_CONFIG_KEYS = ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers")
ARCHITECTURES = {"llama": "LlamaForCausalLM", "gpt": "GPTForCausalLM"}  # else the HF architecture name
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}

# HF Linear (inside a decoder layer) -> (TensorRT-LLM module, parallel style). q/k/v fuse into qkv.
QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
LINEARS = {
    "self_attn.o_proj": ("attention.dense", "row"),
    "mlp.gate_proj": ("mlp.fc", "column"),
    "mlp.up_proj": ("mlp.gate", "column"),
    "mlp.down_proj": ("mlp.proj", "row"),
}
LAYER_TENSORS = {  # replicated layer tensors (norms)
    "input_layernorm.weight": "input_layernorm.weight",
    "post_attention_layernorm.weight": "post_layernorm.weight",
    "self_attn.q_norm.weight": "attention.q_layernorm.weight",
    "self_attn.k_norm.weight": "attention.k_layernorm.weight",
}
EMBEDDING, FINAL_NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"

Axes = tuple[str, ...]  # per dim: "out", "in" or "-" (neither)
Encoder = Callable[[Tensor], Tensor]


@dataclass
class Parts:
    """One TensorRT-LLM Linear before the tensor-parallel split: {suffix: (logical tensor, axes, encoder)}."""

    tensors: dict[str, tuple[Tensor, Axes, Encoder]]


# --- quant_algo of a spec ---------------------------------------------------------------------------------


def codec(spec: QuantSpec) -> Codec:
    """TensorRT-LLM's row for one Linear's spec, or a LowbitError naming the fix."""
    row = codec_for("trtllm", Scheme.of(spec))
    if row is None:
        raise LowbitError(
            f"{spec.describe()} has no TensorRT-LLM checkpoint quant_algo (lowbit writes "
            f"{', '.join(c.name for c in TRTLLM)}); use --format hf or compressed-tensors"
        )
    if len(spec.weight) > 1 and spec.weight[0].group_size != 128:
        # TensorRT-LLM's validate_group_size: W4A8 with other groups unsupported
        raise LowbitError(
            f"{row.name} with group_size {spec.weight[0].group_size}: TensorRT-LLM implements group_size 128 "
            "only; re-quantize with group_size 128 or use --format hf"
        )
    return row


@dataclass(frozen=True)
class Plan:
    """Everything decided before reading a weight: the checks that need no tensors are done here."""

    decoder_type: str
    codec: Codec | None
    group_size: int
    kv_algo: str | None
    dtype: torch.dtype
    tp: int
    pp: int
    layers: int

    @property
    def quant_algo(self) -> str | None:
        return self.codec.name if self.codec is not None else None

    def stage(self, layer: int) -> int:
        return layer // (self.layers // self.pp)

    def ranks(self, stage: int) -> range:
        return range(stage * self.tp, (stage + 1) * self.tp)


def _decoder_type(source: Source, options: ExportOptions) -> str:
    if options.decoder_type:
        return options.decoder_type
    fam = source.family
    if fam is None or not fam.trtllm:
        raise LowbitError(
            f"lowbit has no TensorRT-LLM tensor names for architecture {source.model_type!r}; use --format hf "
            "or compressed-tensors (or --decoder-type llama if its tensors follow the Llama layout)"
        )
    return fam.decoder_type


def make_plan(source: Source, options: ExportOptions) -> Plan:
    cfg = source.config
    decoder = _decoder_type(source, options)
    missing = [k for k in LLAMA_CONFIG_KEYS if k not in cfg]
    if missing:
        raise LowbitError(
            f"{source.model_type!r} has no {missing[0]} in its config: lowbit writes TensorRT-LLM checkpoints "
            "for Llama-style layouts only; use --format hf or compressed-tensors"
        )
    try:
        algos = {codec(spec) for spec in dict.fromkeys(source.modules.values())}
    except LowbitError as e:
        raise LowbitError(f"{source.preset} checkpoint: {e}") from None
    if len(algos) > 1:
        raise LowbitError(
            f"the checkpoint mixes {', '.join(sorted(c.name for c in algos))}; lowbit writes TensorRT-LLM "
            "checkpoints with one quant_algo only; use --format hf"
        )
    algo = algos.pop() if algos else None
    groups = {
        s.weight[0].group_size or DEFAULT_GROUP_SIZE
        for s in source.modules.values()
        if s.weight[0].granularity == "group"
    }
    kv_algo = None
    if source.kv_format is not None:
        if kind(source.kv_format) != "fp8_tensor":
            raise LowbitError(
                f"KV cache format {source.kv_format.name}: lowbit writes FP8 KV caches to TensorRT-LLM "
                "checkpoints only; re-quantize with --kv-cache fp8 or use --format hf"
            )
        kv_algo = "FP8"
    tp, pp = options.tp, options.pp
    heads = int(cfg["num_attention_heads"])
    checks = {
        "num_attention_heads": (heads, tp),
        "num_key_value_heads": (int(cfg.get("num_key_value_heads") or heads), tp),
        "intermediate_size": (int(cfg["intermediate_size"]), tp),
        "vocab_size": (int(cfg["vocab_size"]), tp),
        "num_hidden_layers": (int(cfg["num_hidden_layers"]), pp),
    }
    for key, (value, n) in checks.items():
        if value % n:
            flag = "--inference-pp" if key == "num_hidden_layers" else "--inference-tp"
            raise LowbitError(
                f"{key}={value} is not divisible by {flag} {n}; choose a {flag} that divides it"
            )
    return Plan(
        decoder_type=decoder,
        codec=algo,
        group_size=groups.pop() if len(groups) == 1 else DEFAULT_GROUP_SIZE,
        kv_algo=kv_algo,
        dtype=options.dtype or source.storage_dtype(),
        tp=tp,
        pp=pp,
        layers=int(cfg["num_hidden_layers"]),
    )


# --- one Linear -> Parts ----------------------------------------------------------------------------------


def linear_parts(q: QLinear, row: Codec, dtype: torch.dtype) -> Parts:
    """The logical TensorRT-LLM tensors of one quantized Linear (the row's fields, plus its bias; W4A8's
    prequant_scaling_factor of ones, see the module docstring)."""
    t = row.parts(q)
    if row.name == "W4A8_AWQ":
        t["prequant_scaling_factor"] = (torch.ones(q.weight.shape[1]), ("in",), lambda v: v.to(dtype))
    if q.bias is not None:
        t["bias"] = (q.bias, ("out",), lambda v: v.to(dtype))
    return Parts(t)


def float_parts(weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Parts:
    def cast(v: Tensor) -> Tensor:
        return v.to(dtype)

    t: dict[str, tuple[Tensor, Axes, Encoder]] = {"weight": (weight, ("out", "in"), cast)}
    if bias is not None:
        t["bias"] = (bias, ("out",), cast)
    return Parts(t)


# --- tensor-parallel split ----------------------------------------------------------------------------------


def _chunks(name: str, x: Tensor, axes: Axes, axis: str, tp: int) -> list[Tensor]:
    """x split in tp equal pieces along its `axis` dim, or tp times x where it has no such dim."""
    if axis not in axes:
        return [x] * tp
    dim = axes.index(axis)
    if x.shape[dim] % tp:
        raise LowbitError(
            f"{name}: dim {dim} of size {x.shape[dim]} is not divisible by --inference-tp {tp} "
            "(e.g. in_features / tp not a multiple of the group size); choose another --inference-tp"
        )
    return list(x.chunk(tp, dim))


def split_parts(name: str, parts: list[Parts], style: str, tp: int) -> list[dict[str, Tensor]]:
    """Encoded tensors of one TensorRT-LLM Linear per tp rank. Several parts (q, k, v) are split each and
    concatenated on the output axis per rank; their tensors without that axis must be equal."""
    axis = "out" if style == "column" else "in"
    first = parts[0].tensors
    ranks: list[dict[str, Tensor]] = [{} for _ in range(tp)]
    for suffix, (x, axes, enc) in first.items():
        full = f"{name}.{suffix}"
        if len(parts) > 1 and "out" not in axes:
            for p in parts[1:]:
                if not torch.equal(p.tensors[suffix][0], x):
                    raise LowbitError(
                        f"{full}: q, k and v have different {suffix}; the engine fuses them, re-run quantize"
                    )
        pieces = [_chunks(full, p.tensors[suffix][0], axes, axis, tp) for p in parts]
        for r in range(tp):
            shard = (
                pieces[0][r] if len(parts) == 1 or "out" not in axes else torch.cat([c[r] for c in pieces])
            )
            ranks[r][full] = enc(shard)
    return ranks


def _split_rows(name: str, x: Tensor, tp: int) -> list[Tensor]:
    return _chunks(name, x, ("out",), "out", tp)


# --- units -> ranks ---------------------------------------------------------------------------------------


class RankFiles:
    """One streaming safetensors file per rank: each tensor is written as soon as it is split, and a
    pipeline stage's files are closed once its last layer is in. Memory holds one layer, not the model."""

    def __init__(self, plan: Plan, writer: ExportWriter) -> None:
        self.plan = plan
        self.files = [writer.stream_file(f"rank{r}.safetensors") for r in range(plan.tp * plan.pp)]

    def add(self, stage: int, per_rank: list[dict[str, Tensor]]) -> None:
        for rank, tensors in zip(self.plan.ranks(stage), per_rank, strict=True):
            for name, t in tensors.items():
                self.files[rank].add(name, t)

    def replicate(self, stage: int, tensors: dict[str, Tensor]) -> None:
        self.add(stage, [tensors] * self.plan.tp)

    def write_stage(self, stage: int) -> None:
        for rank in self.plan.ranks(stage):
            self.files[rank].close()


def _shell(unit: Unit, plan: Plan, files: RankFiles) -> None:
    t = dict(unit.tensors)
    if unit.linears:
        raise LowbitError(
            f"{', '.join(unit.linears)} quantized outside the decoder layers; TensorRT-LLM checkpoints keep "
            "embeddings and lm_head in high precision: re-quantize with them excluded or use --format hf"
        )
    missing = [n for n in (EMBEDDING, FINAL_NORM) if n not in t]
    if missing:
        raise LowbitError(f"the checkpoint has no {missing[0]}; this architecture needs --format hf")
    embed, norm = t.pop(EMBEDDING), t.pop(FINAL_NORM)
    head = t.pop(LM_HEAD, embed)  # tied embeddings: TensorRT-LLM gets its own lm_head copy
    if t:
        raise LowbitError(f"{sorted(t)[0]} has no TensorRT-LLM checkpoint name in lowbit; use --format hf")
    last = plan.pp - 1
    embeds = _split_rows(EMBEDDING, embed, plan.tp)
    files.add(0, [{"transformer.vocab_embedding.weight": e.to(plan.dtype)} for e in embeds])
    files.add(last, [{"lm_head.weight": h.to(plan.dtype)} for h in _split_rows(LM_HEAD, head, plan.tp)])
    files.replicate(last, {"transformer.ln_f.weight": norm.to(plan.dtype)})


def _layer_parts(unit: Unit, plan: Plan, module: str) -> Parts:
    q = unit.linears.get(module)
    if q is not None:
        assert plan.codec is not None
        return linear_parts(q, plan.codec, plan.dtype)
    weight = unit.tensors.pop(f"{module}.weight", None)
    if weight is None:
        raise LowbitError(f"{unit.label}: no {module} weight; this architecture needs --format hf")
    return float_parts(weight, unit.tensors.pop(f"{module}.bias", None), plan.dtype)


def _layer(unit: Unit, index: int, plan: Plan, files: RankFiles, excluded: set[str]) -> None:
    stage = plan.stage(index)
    prefix = f"transformer.layers.{index - stage * (plan.layers // plan.pp)}."
    hf = f"{unit.label}."
    qkv = [f"{hf}{m}" for m in QKV]
    if len({m in unit.linears for m in qkv}) > 1:
        raise LowbitError(f"{unit.label}: q/k/v are quantized differently; the engine fuses them into qkv")
    qkv_parts = [_layer_parts(unit, plan, m) for m in qkv]
    files.add(stage, split_parts(prefix + "attention.qkv", qkv_parts, "column", plan.tp))
    for module, (name, style) in LINEARS.items():
        parts = _layer_parts(unit, plan, hf + module)
        files.add(stage, split_parts(prefix + name, [parts], style, plan.tp))
    if plan.quant_algo is not None:
        skipped = [
            n
            for m, (n, _) in [(QKV[0], ("attention.qkv", "")), *LINEARS.items()]
            if hf + m not in unit.linears
        ]
        if skipped and plan.pp > 1:
            raise LowbitError(
                f"{unit.label}: {skipped[0]} is left unquantized; per-layer exclusions are not expressible with "
                "--inference-pp > 1 (TensorRT-LLM names layers per stage); use --inference-pp 1"
            )
        excluded.update(f"transformer.layers.{index}.{n}" for n in skipped)
    for key in list(unit.tensors):
        rel = key[len(hf) :]
        if rel not in LAYER_TENSORS:
            raise LowbitError(f"{key} has no TensorRT-LLM checkpoint name in lowbit; use --format hf")
        files.replicate(stage, {prefix + LAYER_TENSORS[rel]: unit.tensors.pop(key).to(plan.dtype)})
    for kv in unit.kv.values():  # one scale for K and V: the larger
        scale = torch.maximum(kv.scale("k"), kv.scale("v")).reshape(1)
        files.replicate(stage, {prefix + "attention.kv_cache_scaling_factor": scale.float()})


def _rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = dict(cfg.get("rope_parameters") or {})
    base = float(cfg.get("rope_theta") or params.pop("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return base, None
    return base, {"type": kind, **{k: v for k, v in scaling.items() if k not in ("rope_type", "type")}}


def trtllm_config(source: Source, plan: Plan, excluded: list[str], bias: bool) -> dict[str, Any]:
    """config.json of spec §7."""
    cfg = source.config
    heads = int(cfg["num_attention_heads"])
    base, scaling = _rope(cfg)
    architectures = cfg.get("architectures") or ["LlamaForCausalLM"]
    return {
        "architecture": ARCHITECTURES.get(plan.decoder_type, architectures[0]),
        "dtype": DTYPE_NAMES[plan.dtype],
        "logits_dtype": "float32",
        "num_hidden_layers": plan.layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(cfg.get("num_key_value_heads") or heads),
        "hidden_size": int(cfg["hidden_size"]),
        "intermediate_size": int(cfg["intermediate_size"]),
        "vocab_size": int(cfg["vocab_size"]),
        "head_size": int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads),
        "norm_epsilon": float(cfg.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": int(cfg["max_position_embeddings"]),
        "hidden_act": str(cfg.get("hidden_act", "silu")),
        "position_embedding_type": "rope_gpt_neox",
        "rotary_base": base,
        "rotary_scaling": scaling,
        "use_parallel_embedding": True,  # the embedding is split on the vocab dim (embedding_sharding_dim 0)
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,  # lm_head is always written, a copy of the embedding when tied
        "bias": bias,
        "rmsnorm": True,
        "decoder": plan.decoder_type,
        "mapping": {"world_size": plan.tp * plan.pp, "tp_size": plan.tp, "pp_size": plan.pp},
        "quantization": {
            "quant_algo": plan.quant_algo,
            "kv_cache_quant_algo": plan.kv_algo,
            "group_size": plan.group_size,
            "has_zero_point": False,
            "pre_quant_scale": plan.quant_algo == "W4A8_AWQ",
            "exclude_modules": ["lm_head", *excluded] if plan.quant_algo else None,
        },
    }


def export_trtllm(source: Source, writer: ExportWriter, options: ExportOptions) -> None:
    """Write `source` as a TensorRT-LLM checkpoint for tp x pp ranks (spec §7)."""
    plan = make_plan(source, options)
    files = RankFiles(plan, writer)
    excluded: set[str] = set()
    bias = False
    seen = 0
    for unit in source.units():
        if unit.label == "shell":
            _shell(unit, plan, files)
            continue
        index = int(unit.label.rpartition(".")[2])
        if index != seen:
            raise LowbitError(f"{unit.label}: expected layer {seen}; the checkpoint is incomplete")
        bias = bias or any(q.bias is not None for q in unit.linears.values())
        bias = bias or any(k.endswith(".bias") for k in unit.tensors)
        _layer(unit, index, plan, files, excluded)
        log.info("exported %s", unit.label)
        seen += 1
        if seen % (plan.layers // plan.pp) == 0:
            files.write_stage(plan.stage(index))
    if seen != plan.layers:
        raise LowbitError(
            f"the checkpoint has {seen} layers, config.json says {plan.layers}; re-run quantize"
        )
    writer.write_json("config.json", trtllm_config(source, plan, sorted(excluded), bias))
    writer.copy(source.tokenizer_files())
