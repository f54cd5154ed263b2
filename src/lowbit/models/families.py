"""Per-architecture facts as data: where the decoder layers are, what is smoothed together, what the engines
call the architecture.

One entry per family. Algorithms read these facts; they never branch on the architecture themselves.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from lowbit.errors import LowbitError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Smooth:
    """Linears (names inside a decoder layer) that read the output of `prev`, a norm or a Linear, and can be
    smoothed together by scaling their input channels, the inverse scale folded exactly into `prev`.

    `heads`: `prev` is the V projection feeding the attention output projection; with grouped-query
    attention each V channel feeds `num_attention_heads / num_key_value_heads` input channels of the output
    projection, which then share one scale.
    """

    prev: str
    linears: tuple[str, ...]
    heads: bool = False
    also: tuple[str, ...] = ()  # unquantized modules reading the same input (MoE routers): folded too

    def expand(self, names: Iterable[str]) -> list[Smooth]:
        """The concrete groups of a layer whose module names are `names`: `*` stands for an expert index;
        with `*` in `prev` there is one group per expert, else one group of every match."""
        if "*" not in self.prev and not any("*" in n for n in self.linears):
            return [self]
        names = list(names)
        if "*" in self.prev:
            indices = dict.fromkeys(i for n in names for i in _captures(self.prev, n))
            return [
                replace(self, prev=self.prev.replace("*", i),
                        linears=tuple(n.replace("*", i) for n in self.linears))
                for i in indices
            ]  # fmt: skip
        linears = tuple(n for pattern in self.linears for n in names if _captures(pattern, n))
        return [replace(self, linears=linears)] if linears else []


LLAMA_SMOOTH = (
    Smooth("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    Smooth("self_attn.v_proj", ("self_attn.o_proj",), heads=True),
    Smooth("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
    Smooth("mlp.up_proj", ("mlp.down_proj",)),
)


# Linears that inference engines fuse into one GEMM (one weight, one input): they must share their per-tensor
# scales (FP8 weight scale, NVFP4 weight_scale_2, W4A8's FP8 level); calibration ties them (max amax).
LLAMA_FUSED = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp.gate_proj", "mlp.up_proj"),
)


def _captures(pattern: str, name: str) -> list[str]:
    """[the expert index `*` stands for] if `name` matches `pattern` ([""] for a plain equal name), else []."""
    if "*" not in pattern:
        return [""] if pattern == name else []
    m = re.fullmatch(re.escape(pattern).replace(r"\*", r"(\d+)"), name)
    return [m.group(1)] if m else []


def expand_groups(groups: Iterable[tuple[str, ...]], names: Iterable[str], per_expert: bool) -> list[list[str]]:
    """Concrete module groups of one layer from patterns where `*` stands for an expert index: one group per
    index (`per_expert`: an expert's gate and up share a GEMM) or one group of every match (every expert of
    the block shares one input scale in the engines)."""
    names = list(names)
    out: list[list[str]] = []
    for group in groups:
        if not per_expert or not any("*" in p for p in group):
            members = [n for p in group for n in names if _captures(p, n)]
            if members:
                out.append(members)
            continue
        by_index: dict[str, list[str]] = {}
        for p in group:
            for n in names:
                for i in _captures(p, n):
                    by_index.setdefault(i, []).append(n)
        out.extend(by_index.values())
    return out


@dataclass(frozen=True)
class MoE:
    """A family's mixture-of-experts block: where its experts are and what the checkpoint calls each expert's
    projections (models/moe.py turns the fused 3-D experts of transformers into one Linear each)."""

    experts: str  # the fused experts module inside a decoder layer
    gate: str | None  # None: experts without a gate (Nemotron-H: down(act(up(x))))
    up: str
    down: str
    router: str  # kept in high precision (the default skips)

    def linears(self, which: str) -> str:
        return f"{self.experts}.*.{getattr(self, which)}"

    @property
    def inputs(self) -> tuple[str, ...]:
        """The expert Linears that read the block's input."""
        return (self.linears("gate"), self.linears("up")) if self.gate is not None else (self.linears("up"),)


def moe_facts(moe: MoE, shared: str | None = None, shared_gate: str | None = None) -> dict[str, Any]:
    """Smoothing groups, fused GEMMs and shared input scales of a Llama-style layer whose MLP is `moe`, with
    an optional always-on `shared` gated-MLP expert (Qwen2-MoE) scaled by a `shared_gate` Linear."""
    up, down = moe.linears("up"), moe.linears("down")
    shared_in = (f"{shared}.gate_proj", f"{shared}.up_proj") if shared else ()
    return dict(
        smooth=(
            *LLAMA_SMOOTH[:2],
            # the router (and the shared expert's gate) read the normed input too: their weights take the
            # scales, so routing and gating are unchanged
            Smooth("post_attention_layernorm", (*moe.inputs, *shared_in),
                   also=(moe.router, *((shared_gate,) if shared_gate else ()))),
            Smooth(up, (down,)),
            *((Smooth(f"{shared}.up_proj", (f"{shared}.down_proj",)),) if shared else ()),
            *LLAMA_SMOOTH[2:],  # dense MLP layers of a MoE model (Qwen3-MoE's mlp_only_layers)
        ),
        fused=(*LLAMA_FUSED, moe.inputs, *((shared_in,) if shared else ())),
        shared_inputs=(moe.inputs, (down,)),
        moe=moe,
    )


NEMOTRON_H_MOE = MoE("mixer.experts", None, "up_proj", "down_proj", "mixer.gate")
NEMOTRON_H_QKV = ("mixer.q_proj", "mixer.k_proj", "mixer.v_proj")
# Nemotron-H: every block is norm -> one mixer (Mamba-2, attention, MLP or MoE) -> residual add
NEMOTRON_H: dict[str, Any] = dict(
    smooth=(
        Smooth("norm", NEMOTRON_H_QKV),
        Smooth("mixer.v_proj", ("mixer.o_proj",), heads=True),
        Smooth("norm", ("mixer.in_proj",)),  # Mamba-2
        Smooth("mixer.norm", ("mixer.out_proj",)),  # Mamba-2's gated RMSNorm feeds out_proj
        Smooth("norm", ("mixer.up_proj",)),  # MLP: relu^2 lies between up and down, so no up -> down fold
        Smooth("norm", (NEMOTRON_H_MOE.linears("up"), "mixer.shared_experts.up_proj"), also=("mixer.gate",)),
    ),
    fused=(NEMOTRON_H_QKV,),
    shared_inputs=((NEMOTRON_H_MOE.linears("up"),), (NEMOTRON_H_MOE.linears("down"),)),
    moe=NEMOTRON_H_MOE,
    renames=(("backbone.", "model."),),
    per_layer_kwargs=True,
)


@dataclass(frozen=True)
class Family:
    model_types: tuple[str, ...]
    layers: str  # path of the decoder layers' ModuleList
    decoder_type: str  # TensorRT-LLM decoder type
    smooth: tuple[Smooth, ...] = ()
    # Linears whose clip search is skipped. AutoAWQ skips q/k (attention scores); on pydocs-llama clipping
    # them too gave 13% lower KL at int4 (docs/experiments, the 2026-11-23 calibration-algorithms entry), so
    # no family skips any by default.
    no_clip: tuple[str, ...] = field(default=())
    fused: tuple[tuple[str, ...], ...] = LLAMA_FUSED
    # Linears (patterns, `*` = every expert) whose input quantizers engines run with one scale: the
    # experts of a MoE block (vLLM's fused MoE takes one input scale for w1/w3 and one for w2 per layer)
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    moe: MoE | None = None
    norm_offset: float = 0.0  # the norms compute x_hat * (norm_offset + weight)
    # layers of different kinds get different arguments from the model (sliding-window vs full attention
    # masks, Mamba vs attention masks): calibration records each layer's own
    per_layer_kwargs: bool = False
    # checkpoint name fragment -> module name fragment (transformers renames these on load)
    renames: tuple[tuple[str, str], ...] = ()
    known: bool = True  # False: discovered from the model's structure (no smoothing / fusion facts)
    # TensorRT-LLM checkpoints: lowbit knows the tensor names of Llama-style layers (separate q/k/v and
    # gate/up/down, RMS norms, optional q/k norms) only
    trtllm: bool = False


FAMILIES: tuple[Family, ...] = (
    Family(("llama",), "model.layers", "llama", LLAMA_SMOOTH, trtllm=True),
    Family(("mistral",), "model.layers", "llama", LLAMA_SMOOTH, trtllm=True),
    Family(("mixtral",), "model.layers", "mixtral", renames=((".block_sparse_moe.", ".mlp."),),
           **moe_facts(MoE("mlp.experts", "w1", "w3", "w2", "mlp.gate"))),
    Family(("qwen2", "qwen3"), "model.layers", "qwen", LLAMA_SMOOTH, trtllm=True),
    # vision-language models: the language model is quantized; the vision tower and its projector (merger)
    # are skipped by default and exported unchanged
    Family(("qwen3_vl",), "model.language_model.layers", "qwen", LLAMA_SMOOTH),
    # Qwen2.5-VL checkpoints keep the older names (model.layers, visual.*)
    Family(("qwen2_5_vl",), "model.language_model.layers", "qwen", LLAMA_SMOOTH,
           renames=(("model.", "model.language_model."), ("visual.", "model.visual."))),
    Family(("qwen3_moe",), "model.layers", "qwen",
           **moe_facts(MoE("mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate"))),
    Family(("qwen2_moe",), "model.layers", "qwen",
           **moe_facts(MoE("mlp.experts", "gate_proj", "up_proj", "down_proj", "mlp.gate"),
                       shared="mlp.shared_expert", shared_gate="mlp.shared_expert_gate")),
    # Gemma's RMSNorm scales by (1 + weight): smoothing folds into that
    Family(("gemma",), "model.layers", "gemma", LLAMA_SMOOTH, trtllm=True, norm_offset=1.0),
    # Gemma 2 / 3: the norm before the MLP is pre_feedforward_layernorm (post_attention_layernorm normalizes
    # the attention output before the residual add)
    Family(("gemma2", "gemma3_text"), "model.layers", "gemma",
           (*LLAMA_SMOOTH[:2], Smooth("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
            LLAMA_SMOOTH[3]), norm_offset=1.0, per_layer_kwargs=True),
    # Phi-3: q/k/v and gate/up are fused Linears in the checkpoint already
    Family(("phi3",), "model.layers", "phi3",
           (Smooth("input_layernorm", ("self_attn.qkv_proj",)),
            Smooth("post_attention_layernorm", ("mlp.gate_up_proj",))), fused=()),
    Family(("nemotron_h",), "model.layers", "nemotron_h", **NEMOTRON_H),
    # StarCoder2: LayerNorms with bias; GELU between c_fc and c_proj (no fold there)
    Family(("starcoder2",), "model.layers", "gpt",
           (*LLAMA_SMOOTH[:2], Smooth("post_attention_layernorm", ("mlp.c_fc",))), fused=(LLAMA_FUSED[0],)),
    # StarCoder / SantaCoder: q/k/v are one Linear already (c_attn); GELU sits between c_fc and c_proj
    # GPT-2: Conv1D layers (models/conv1d.py); the same fused c_attn and GELU MLP as StarCoder
    Family(("gpt2",), "transformer.h", "gpt",
           (Smooth("ln_1", ("attn.c_attn",)), Smooth("ln_2", ("mlp.c_fc",))), fused=()),
    Family(("gpt_bigcode",), "transformer.h", "gpt",
           (Smooth("ln_1", ("attn.c_attn",)), Smooth("ln_2", ("mlp.c_fc",))), fused=()),
)

SUPPORTED = tuple(t for f in FAMILIES for t in f.model_types)


def _rename(name: str, old: str, new: str) -> str:
    """Replace a fragment: one that starts with '.' anywhere (a module name ending in it too), any other as a
    prefix only."""
    if old.startswith("."):
        return (name + ".").replace(old, new)[:-1]
    return new + name[len(old) :] if name.startswith(old) else name


def to_module_name(name: str, fam: Family | None) -> str:
    """A checkpoint tensor name as the model's modules name it."""
    for stored, module in fam.renames if fam is not None else ():
        name = _rename(name, stored, module)
    return name


def to_checkpoint_name(name: str, fam: Family | None) -> str:
    """A module's tensor name as the original checkpoint (and the engines reading exports) name it."""
    for stored, module in fam.renames if fam is not None else ():
        name = _rename(name, module, stored)
    return name


def find_family(model_type: str) -> Family | None:
    """The facts of `model_type`, or None where lowbit has none."""
    return next((f for f in FAMILIES if model_type in f.model_types), None)


def family(model_type: str) -> Family:
    f = find_family(model_type)
    if f is not None:
        return f
    raise LowbitError(
        f"unsupported architecture {model_type!r}; supported model types: {', '.join(SUPPORTED)}"
    )


LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def resolve_family(config: Any, model: nn.Module) -> Family:
    """The family facts of `config.model_type`, or, for an architecture transformers knows and lowbit has no
    facts for, facts discovered from the (meta) model: its decoder layers are the first ModuleList holding
    `num_hidden_layers` blocks. Such a model quantizes with max / GPTQ / MSE on every Linear; AWQ and
    SmoothQuant need smoothing groups and are skipped with a warning, and engines' fused scales are not tied."""
    model_type = str(getattr(config, "model_type", ""))
    known = find_family(model_type)
    if known is not None:
        return known
    n = next(
        (getattr(config, k) for k in LAYER_COUNT_KEYS if isinstance(getattr(config, k, None), int)), None
    )
    path = next(
        (name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and name and len(m) == n),
        None,
    )
    if path is None:
        raise LowbitError(
            f"unsupported architecture {model_type!r}: no list of {n} decoder layers found in the model; "
            f"supported model types: {', '.join(SUPPORTED)}"
        )
    log.warning(
        "no lowbit facts for model type %r: decoder layers found at %s; every Linear is quantized, but "
        "AWQ / SmoothQuant (no smoothing groups), fused-scale ties and the TensorRT-LLM decoder type need an "
        "entry in lowbit/models/families.py",
        model_type, path,
    )  # fmt: skip
    return replace(Family((model_type,), path, ""), fused=(), known=False)


def whole_model_family(model: nn.Module) -> Family | None:
    """The model's family facts with per-layer names made full names (model.layers.3.input_layernorm), for
    calibrating or training the whole model at once; None for a model without facts."""
    config = getattr(model, "config", None)
    try:
        fam = family(getattr(config, "model_type", ""))
    except LowbitError:
        return None
    layers = model.get_submodule(fam.layers)
    n = len(layers)  # type: ignore[arg-type]
    smooth = tuple(
        replace(s, prev=f"{fam.layers}.{i}.{s.prev}", linears=tuple(f"{fam.layers}.{i}.{x}" for x in s.linears),
                also=tuple(f"{fam.layers}.{i}.{x}" for x in s.also))
        for i in range(n) for s in fam.smooth
    )  # fmt: skip

    def per_layer(groups: tuple[tuple[str, ...], ...]) -> tuple[tuple[str, ...], ...]:
        return tuple(tuple(f"{fam.layers}.{i}.{x}" for x in group) for i in range(n) for group in groups)

    no_clip = tuple(f"{fam.layers}.{i}.{x}" for i in range(n) for x in fam.no_clip)
    return replace(fam, smooth=smooth, no_clip=no_clip, fused=per_layer(fam.fused),
                   shared_inputs=per_layer(fam.shared_inputs))  # fmt: skip
