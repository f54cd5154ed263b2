"""Recipes: ordered glob rules mapping module names to a QuantSpec (None = keep in high precision).

A preset is data: the table in docs (and ../shared/specs/formats.md §3) written as rules. First match wins;
the default skips (lm_head, embeddings, routers, conv1d, vision towers, ...) come first.
"""

from __future__ import annotations

import dataclasses
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
from lowbit.quant.steps import STEPS, Algorithm, AlgorithmParams, closest

# the steps that fit the weights to the layer's inputs (sequential by default), and an algorithm's step names:
# for benchmarks/side_by_side.py; lowbit itself asks the records (quant/steps.py)
SEQUENTIAL_STEPS = frozenset(name for name, step in STEPS.items() if step.fits_weights)


def algorithm_steps(name: str) -> frozenset[str]:
    """The step names of an algorithm such as 'awq_full+gptq' (checked as `Algorithm.parse` checks it)."""
    return Algorithm.parse(name).names


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

    @property
    def steps(self) -> Algorithm:
        """The algorithm's steps, as records (quant/steps.py)."""
        return Algorithm.parse(self.algorithm)

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


def preset(name: str) -> Recipe:
    """The built-in recipe called `name`."""
    if name not in PRESETS:
        raise LowbitError(
            f"unknown preset {name!r}{closest(name, list(PRESETS))}; choose one of {', '.join(PRESETS)}"
        )
    return PRESETS[name]


def check_algorithm(name: str) -> str:
    """`name` normalised ('awq+gptq' -> 'awq_lite+gptq'), or a LowbitError naming the closest algorithm."""
    return str(Algorithm.parse(name))


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
