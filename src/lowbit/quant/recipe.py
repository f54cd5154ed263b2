"""Recipes: ordered glob rules mapping module names to a QuantSpec (None = keep in high precision).

A preset is data: the table in docs (and ../shared/specs/formats.md §3) written as rules. First match wins;
the default skips (lm_head, embeddings, routers, conv1d, vision towers, ...) come first.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml

from lowbit.errors import LowbitError
from lowbit.formats.scaled import (
    FORMATS,
    FP8_BLOCK128,
    FP8_CHANNEL,
    FP8_TENSOR,
    FP8_TOKEN,
    INT4_G128,
    INT8_CHANNEL,
    INT8_TENSOR,
    MXFP4,
    MXFP4_DYNAMIC,
    MXFP8,
    MXFP8_DYNAMIC,
    NVFP4,
    NVFP4_DYNAMIC,
    ScaledFormat,
)
from lowbit.quant.linear import QuantSpec

ALGORITHM_STEPS = (
    "max",
    "smoothquant",
    "awq_lite",
    "awq_clip",
    "awq_full",
    "gptq",
    "gptaq",
    "mse",
    "percentile",
    "none",
)
ALGORITHM_ALIASES = {"awq": "awq_lite", "sq": "smoothquant"}
ALGORITHMS = (*ALGORITHM_STEPS, "awq+gptq", "awq_full+gptq", "smoothquant+gptq", "mse+gptq")  # common ones


CALIB_DTYPES = ("auto", "float32", "bfloat16")
MOE_WEIGHTINGS = ("routed", "uniform")


@dataclass(frozen=True)
class AlgorithmParams:
    """Parameters of the calibration algorithms (CLI flags / the `algorithm_params` key of a YAML recipe)."""

    sq_alpha: float = 1.0  # SmoothQuant migration strength (the sweep in docs/results.md: 1.0 is best)
    awq_grid: int = 20  # AWQ alpha grid points in [0, 1)
    clip_grid: int = 10  # clip ratios 1.0, 0.95, ... (awq_clip, mse)
    clip_min: float = 0.5  # smallest clip ratio
    gptq_block_size: int = 128
    gptq_damp: float = 0.01  # fraction of mean(diag H) added to the diagonal
    gptq_act_order: bool = True  # columns by descending diag(H), with static groups
    # rounds of GPTQ's codes then group scales refitted to them, each round on the scales of the one before
    # (one-stage symmetric group formats: INT4, NVFP4, MXFP4; each row keeps its best round). 4: the best of
    # 1, 4, 8, 16 on pydocs-llama's validation text (docs/results.md section 14)
    gptq_rounds: int = 4
    # GPTQ module by module in the layer's forward order (q/k/v, o, gate/up, down): each one's Hessian (and
    # GPTAQ's cross term) from inputs computed with the modules before it in the layer already quantized.
    # None: on with sequential GPTAQ (its float target then also corrects the error of the modules before
    # it: -10% KL on pydocs-llama), off with GPTQ (no gain measured); docs/results.md section 14
    true_sequential: bool | None = None
    # GPTAQ: fraction of the float-input correction W D H^-1 in GPTQ's target. None: 1.0 true-sequential,
    # 0.25 otherwise (the best of each sweep in docs/results.md)
    gptaq_alpha: float | None = None
    gptaq_routers: bool = True  # GPTAQ: refit MoE routers (high precision) to the float model's logits
    # a MoE expert's input statistics (AWQ's mean |x| and loss, GPTQ's Hessian, GPTAQ's cross term) over every
    # calibration token, each token weighted by what the expert's error costs the block's output: "routed" =
    # its routing weight squared where the router chose the expert, plus for every token `moe_weight_floor`
    # times the mean routed weight squared (near misses; an expert the router never chose is calibrated on all
    # tokens alike); "uniform" = every token alike. The floor: docs/results.md section 16
    moe_weighting: str = "routed"
    moe_weight_floor: float = 1e-3
    percentile: float = 99.99  # activation amax percentile ("percentile" step)
    # True: each layer is calibrated on the outputs of the quantized layers before it; False: on the float
    # model's activations (one pass per layer instead of two, as ModelOpt does); None: True where a step fits
    # the weights to the layer's inputs (AWQ, GPTQ), False where only scales are observed (max, smoothquant:
    # the same KL either way on pydocs-llama, in half the time; docs/results.md section 13)
    sequential: bool | None = None
    # dtype of the matrix products in calibration's forward passes: "auto" = the checkpoint's own (a BF16
    # model runs bf16 products with fp32 accumulation, as on a GPU; 5x faster on AMX CPUs), "float32", or
    # "bfloat16". Weights, statistics and every algorithm's own arithmetic stay fp32 whatever this is.
    calib_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.gptq_rounds < 1:
            raise LowbitError(f"gptq_rounds {self.gptq_rounds}: use 1 or more (1 = GPTQ once, as published)")
        if self.moe_weighting not in MOE_WEIGHTINGS:
            raise LowbitError(
                f"unknown moe_weighting {self.moe_weighting!r}{closest(str(self.moe_weighting), MOE_WEIGHTINGS)}; "
                f"use one of {', '.join(MOE_WEIGHTINGS)}"
            )
        if not self.moe_weight_floor > 0:
            raise LowbitError(
                f"moe_weight_floor {self.moe_weight_floor}: use a positive number (it keeps every token in an "
                "expert's statistics; 0.001 is the default)"
            )
        if self.calib_dtype not in CALIB_DTYPES:
            raise LowbitError(
                f"unknown calib_dtype {self.calib_dtype!r}{closest(str(self.calib_dtype), CALIB_DTYPES)}; "
                f"use one of {', '.join(CALIB_DTYPES)}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SEQUENTIAL_STEPS = frozenset({"awq_lite", "awq_clip", "awq_full", "gptq", "gptaq"})


def is_sequential(params: AlgorithmParams, algorithm: str) -> bool:
    """Whether `algorithm` calibrates each layer on the quantized layers' outputs (AlgorithmParams.sequential)."""
    if params.sequential is not None:
        return params.sequential
    return bool(algorithm_steps(algorithm) & SEQUENTIAL_STEPS)


def is_true_sequential(params: AlgorithmParams, algorithm: str) -> bool:
    """Whether GPTQ / GPTAQ quantizes a layer's modules stage by stage (AlgorithmParams.true_sequential)."""
    if params.true_sequential is not None:
        return params.true_sequential
    return "gptaq" in algorithm_steps(algorithm) and is_sequential(params, algorithm)


def gptaq_alpha(params: AlgorithmParams, algorithm: str) -> float:
    """GPTAQ's share of the float-input correction (AlgorithmParams.gptaq_alpha)."""
    if params.gptaq_alpha is not None:
        return params.gptaq_alpha
    return 1.0 if is_true_sequential(params, algorithm) else 0.25


def algorithm_steps(name: str) -> frozenset[str]:
    """The steps of an algorithm name such as 'awq_full+gptq' (checked: at most one smoothing method)."""
    steps = [ALGORITHM_ALIASES.get(s.strip(), s.strip()) for s in name.split("+")]
    for step in steps:
        if step not in ALGORITHM_STEPS:
            raise LowbitError(
                f"unknown algorithm step {step!r}{closest(step, ALGORITHM_STEPS)} in {name!r}; "
                f"combine {', '.join(ALGORITHM_STEPS)} with '+' (e.g. awq+gptq)"
            )
    found = frozenset(steps)
    if "smoothquant" in found and found & {"awq_lite", "awq_full"}:
        raise LowbitError(f"{name!r}: SmoothQuant and AWQ both smooth; choose one of them")
    if {"gptq", "gptaq"} <= found:
        raise LowbitError(f"{name!r}: GPTAQ is GPTQ with the float model's inputs; choose one of them")
    if "none" in found and len(found) > 1:
        raise LowbitError(f"{name!r}: 'none' (no calibration) cannot be combined with other steps")
    return found


DEFAULT_SKIPS = (
    "*lm_head*",
    "*embed*",
    "*wte", "*wpe",
    "*router*",
    "*mlp.gate",
    "*block_sparse_moe.gate",
    "*shared_expert_gate*",
    "*conv1d*",
    "*visual*",
    "*vision_tower*",
    "*vision_model*",
    "*multi_modal_projector*",
    "*mtp*",
)  # fmt: skip


@dataclass(frozen=True)
class Rule:
    pattern: str
    spec: QuantSpec | None


@dataclass(frozen=True)
class Recipe:
    """Rules (first match wins) plus the calibration algorithm the recipe asks for and the KV cache format."""

    name: str
    rules: tuple[Rule, ...]
    algorithm: str = "max"
    kv_cache: ScaledFormat | None = None
    skips: tuple[str, ...] = field(default=DEFAULT_SKIPS)
    params: AlgorithmParams = field(default_factory=AlgorithmParams)

    def resolve(self, module_name: str) -> QuantSpec | None:
        for pattern in self.skips:
            if fnmatchcase(module_name, pattern):
                return None
        for rule in self.rules:
            if fnmatchcase(module_name, rule.pattern):
                return rule.spec
        return None

    def matching_rule(self, module_name: str) -> str:
        """The pattern that decided `module_name` (for `lowbit inspect`)."""
        for pattern in self.skips:
            if fnmatchcase(module_name, pattern):
                return f"skip {pattern}"
        for rule in self.rules:
            if fnmatchcase(module_name, rule.pattern):
                return rule.pattern
        return "no rule"

    def with_exclude(self, patterns: str | Sequence[str]) -> Recipe:
        """A copy that leaves modules matching the glob(s) unquantized (one string is one glob)."""
        return replace(
            self, skips=((patterns,) if isinstance(patterns, str) else tuple(patterns)) + self.skips
        )

    def with_kv_cache(self, kv: str | None) -> Recipe:
        return replace(self, kv_cache=kv_cache_format(kv))

    def with_algorithm(self, algorithm: str) -> Recipe:
        return replace(self, algorithm=check_algorithm(algorithm))

    def with_params(self, **changes: Any) -> Recipe:
        """A copy with some AlgorithmParams changed (unknown names are errors naming the closest one)."""
        known = [f.name for f in dataclasses.fields(AlgorithmParams)]
        for key in changes:
            if key not in known:
                raise LowbitError(
                    f"unknown algorithm parameter {key!r}{closest(key, known)}; known: {', '.join(known)}"
                )
        return replace(self, params=replace(self.params, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "algorithm": self.algorithm,
            "algorithm_params": self.params.to_dict(),
            "kv_cache": format_to_dict(self.kv_cache) if self.kv_cache else None,
            "skips": list(self.skips),
            "rules": [{"pattern": r.pattern, **spec_to_dict(r.spec)} for r in self.rules],
        }


def _all(
    weight: ScaledFormat | tuple[ScaledFormat, ...], act: ScaledFormat | None = None
) -> tuple[Rule, ...]:
    w = weight if isinstance(weight, tuple) else (weight,)
    return (Rule("*", QuantSpec(w, act)),)


PRESETS: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp8", _all(FP8_TENSOR, FP8_TENSOR)),
        Recipe("fp8_pc_pt", _all(FP8_CHANNEL, FP8_TOKEN)),
        Recipe("fp8_pb_wo", _all(FP8_BLOCK128)),
        Recipe("int8_sq", _all(INT8_CHANNEL, INT8_TENSOR), algorithm="smoothquant"),
        Recipe("int8_wo", _all(INT8_CHANNEL)),
        Recipe("int4_awq", _all(INT4_G128), algorithm="awq_full"),
        Recipe("w4a8_awq", _all((INT4_G128, FP8_TENSOR), FP8_TENSOR), algorithm="awq_full"),
        Recipe("nvfp4", _all(NVFP4, NVFP4_DYNAMIC)),
        Recipe("nvfp4_awq", _all(NVFP4, NVFP4_DYNAMIC), algorithm="awq_full"),
        Recipe("nvfp4_wo", _all(NVFP4)),
        Recipe("mxfp8", _all(MXFP8, MXFP8_DYNAMIC), algorithm="none"),
        Recipe("mxfp4", _all(MXFP4, MXFP4_DYNAMIC), algorithm="none"),
        Recipe("no_quant", (), algorithm="none"),
    )
}

KV_CACHE_FORMATS: dict[str, ScaledFormat | None] = {"fp8": FP8_TENSOR, "nvfp4": NVFP4_DYNAMIC, "none": None}


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


def preset(name: str) -> Recipe:
    """The built-in recipe called `name`."""
    if name not in PRESETS:
        raise LowbitError(
            f"unknown preset {name!r}{closest(name, list(PRESETS))}; choose one of {', '.join(PRESETS)}"
        )
    return PRESETS[name]


def check_algorithm(name: str) -> str:
    """`name` normalised ('awq+gptq' -> 'awq_lite+gptq'), or a LowbitError naming the closest algorithm."""
    if "+" not in name and ALGORITHM_ALIASES.get(name, name) not in ALGORITHM_STEPS:
        raise LowbitError(
            f"unknown algorithm {name!r}{closest(name, ALGORITHMS)}; choose one of {', '.join(ALGORITHMS)}"
        )
    algorithm_steps(name)
    return "+".join(ALGORITHM_ALIASES.get(s.strip(), s.strip()) for s in name.split("+"))


def kv_cache_format(name: str | None) -> ScaledFormat | None:
    key = name or "none"
    if key not in KV_CACHE_FORMATS:
        raise LowbitError(f"unknown --kv-cache {key!r}; choose one of {', '.join(KV_CACHE_FORMATS)}")
    return KV_CACHE_FORMATS[key]


# --- formats and recipes as plain data (YAML / JSON) -------------------------------------------------------


def format_to_dict(fmt: ScaledFormat) -> dict[str, Any]:
    base = FORMATS.get(fmt.name)
    out: dict[str, Any] = {"format": fmt.name}
    if base is not None and base != fmt:
        for key in ("group_size", "dynamic", "symmetric"):
            if getattr(base, key) != getattr(fmt, key):
                out[key] = getattr(fmt, key)
    return out


def format_from_data(data: Any, where: str) -> ScaledFormat:
    """A format from a name ('int4_g128') or a mapping ({format: int4_g128, group_size: 64})."""
    if isinstance(data, str):
        data = {"format": data}
    if not isinstance(data, dict) or "format" not in data:
        raise LowbitError(f"{where}: a format is a name or a mapping with a 'format' key, got {data!r}")
    name = str(data["format"])
    if name not in FORMATS:
        raise LowbitError(
            f"{where}: unknown format {name!r}{closest(name, list(FORMATS))}; "
            f"known formats: {', '.join(FORMATS)}"
        )
    extra = {k: v for k, v in data.items() if k != "format"}
    allowed = {"group_size", "dynamic", "symmetric"}
    if set(extra) - allowed:
        bad = sorted(set(extra) - allowed)[0]
        raise LowbitError(f"{where}: unknown format option {bad!r}; allowed: {', '.join(sorted(allowed))}")
    fmt = FORMATS[name]
    if "group_size" in extra and fmt.granularity != "group":
        raise LowbitError(f"{where}: format {name!r} has no groups; group_size applies to group formats only")
    return fmt.replace(**extra) if extra else fmt


def recipe_from_data(data: Any, source: str) -> Recipe:
    """A recipe from parsed YAML: {name, algorithm, kv_cache, exclude, rules: [{pattern, weight, input}]}."""
    if not isinstance(data, dict):
        raise LowbitError(f"{source}: a recipe is a mapping with a 'rules' list")
    allowed = {"name", "algorithm", "algorithm_params", "kv_cache", "exclude", "rules"}
    for key in data:
        if key not in allowed:
            raise LowbitError(f"{source}: unknown key {key!r}{closest(str(key), sorted(allowed))}")
    rules = []
    for i, rule in enumerate(data.get("rules") or []):
        where = f"{source}: rules[{i}]"
        if not isinstance(rule, dict) or "pattern" not in rule:
            raise LowbitError(f"{where}: each rule needs a 'pattern' (a glob such as '*mlp*')")
        weight = rule.get("weight")
        if weight is None:
            rules.append(Rule(str(rule["pattern"]), None))
            continue
        weights = weight if isinstance(weight, list) else [weight]
        fmts = tuple(format_from_data(w, f"{where}.weight") for w in weights)
        act = rule.get("input")
        spec = QuantSpec(fmts, format_from_data(act, f"{where}.input") if act is not None else None)
        rules.append(Rule(str(rule["pattern"]), spec))
    recipe = Recipe(str(data.get("name", Path(source).stem)), tuple(rules))
    recipe = recipe.with_algorithm(str(data.get("algorithm", "max")))
    params = data.get("algorithm_params") or {}
    if not isinstance(params, dict):
        raise LowbitError(f"{source}: algorithm_params is a mapping such as {{sq_alpha: 0.5}}")
    recipe = recipe.with_params(**params)
    recipe = recipe.with_kv_cache(data.get("kv_cache"))
    return recipe.with_exclude(list(data.get("exclude") or []))


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise LowbitError(f"recipe file {str(p)!r} does not exist; pass a YAML file to --recipe")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise LowbitError(f"{p}: not valid YAML ({str(e).splitlines()[0]}); fix the file") from None
    return recipe_from_data(data, str(p))


def spec_to_dict(spec: QuantSpec | None) -> dict[str, Any]:
    if spec is None:
        return {"weight": None}
    return {
        "weight": [format_to_dict(f) for f in spec.weight],
        "input": format_to_dict(spec.input) if spec.input else None,
    }


def spec_from_dict(data: dict[str, Any]) -> QuantSpec | None:
    if data.get("weight") is None:
        return None
    fmts = tuple(format_from_data(w, "recipe") for w in data["weight"])
    return QuantSpec(fmts, format_from_data(data["input"], "recipe") if data.get("input") else None)


def recipe_from_dict(data: dict[str, Any]) -> Recipe:
    """Inverse of Recipe.to_dict (the resolved recipe stored in a checkpoint)."""
    rules = [Rule(r["pattern"], spec_from_dict(r)) for r in data["rules"]]
    kv = format_from_data(data["kv_cache"], "recipe") if data.get("kv_cache") else None
    params = AlgorithmParams(**data.get("algorithm_params", {}))
    return Recipe(data["name"], tuple(rules), data["algorithm"], kv, tuple(data["skips"]), params)
