"""Calibration algorithms as data: one `Step` record per algorithm step, its parameters as dataclasses.

An algorithm is steps joined by '+' ('awq_full+gptq'). `Algorithm.parse` checks the combination and answers
what calibration asks of it: does it need data, which input statistics it reads (the Hessian, mean |x|), how
it smooths, which weight-scale searches it runs, GPTQ, GPTAQ's float reference, percentile sampling, and the
defaults of the tri-state parameters (sequential, true-sequential, GPTAQ's alpha). The code asks these
records, never a step's name.

The parameters are one dataclass per what reads them (`SmoothQuantParams`, ..., `CalibrationParams`);
`AlgorithmParams` composes them into the flat record a recipe holds. Its field names are the YAML
`algorithm_params` keys and lowbit.json's `recipe.algorithm_params`; `param_flags` makes the command line's
flags from the fields and their metadata (help, choices).
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from lowbit.errors import LowbitError

CALIB_DTYPES = ("auto", "float32", "bfloat16")
MOE_WEIGHTINGS = ("routed", "uniform")


def closest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """' (did you mean X?)' for the closest choice, or ''."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {match[0]!r}?)" if match else ""


# --- parameters ----------------------------------------------------------------------------------------------


def _param(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] = (),
    check: Callable[[Any], str | None] | None = None,
    flag: bool = True,
) -> Any:
    """A parameter field: `help` (the flag's help), `choices` (checked), `check` (a value -> the problem with
    it, or None), `flag` (False: a YAML key only, no command-line flag)."""
    return field(default=default, metadata={"help": help, "choices": choices, "check": check, "flag": flag})


@dataclass(frozen=True)
class _Params:
    """Checks every field against its metadata (`_param`): the messages name the value and the fix."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            choices = f.metadata.get("choices") or ()
            if choices and value not in choices:
                raise LowbitError(
                    f"unknown {f.name} {value!r}{closest(str(value), choices)}; use one of {', '.join(choices)}"
                )
            check = f.metadata.get("check")
            problem = check(value) if check is not None else None
            if problem:
                raise LowbitError(f"{f.name} {value}: {problem}")


@dataclass(frozen=True)
class SmoothQuantParams(_Params):
    """Read by `smoothquant`."""

    # migration strength (the sweep in docs/experiments, the 2026-11-23 calibration-algorithms entry: 1.0 is best)
    sq_alpha: float = _param(1.0, "SmoothQuant migration strength (0..1)")


@dataclass(frozen=True)
class AWQParams(_Params):
    """Read by AWQ's scale search (`awq_lite`, `awq_full`)."""

    awq_grid: int = _param(20, "AWQ alpha grid points (default 20)")  # alphas in [0, 1)


@dataclass(frozen=True)
class ClipParams(_Params):
    """Read by the weight-scale searches (`awq_clip`, `awq_full`, `mse`)."""

    clip_grid: int = _param(10, "clip ratios 1.0, 0.95, ... (awq_clip, mse)", flag=False)
    clip_min: float = _param(0.5, "smallest clip ratio", flag=False)


@dataclass(frozen=True)
class GPTQParams(_Params):
    """Read by `gptq` and `gptaq`."""

    gptq_block_size: int = _param(128, "GPTQ columns per block (default 128)")
    gptq_damp: float = _param(0.01, "GPTQ damping, fraction of mean diag(H)")  # added to the diagonal
    gptq_act_order: bool = _param(
        True, "GPTQ columns by descending Hessian diagonal, static groups (default on)"
    )
    # rounds of GPTQ's codes then group scales refitted to them, each round on the scales of the one before
    # (one-stage symmetric group formats: INT4, NVFP4, MXFP4; each row keeps its best round). 4: the best of
    # 1, 4, 8, 16 on pydocs-llama's validation text (docs/experiments, the 2026-12-03 GPTQ entry)
    gptq_rounds: int = _param(
        4,
        "GPTQ's codes then group scales refitted to them, this many times (INT4/NVFP4/MXFP4 groups; default 4)",
        check=lambda v: None if v >= 1 else "use 1 or more (1 = GPTQ once, as published)",
    )
    # GPTQ module by module in the layer's forward order (q/k/v, o, gate/up, down): each one's Hessian (and
    # GPTAQ's cross term) from inputs computed with the modules before it in the layer already quantized.
    # None: on with sequential GPTAQ (its float target then also corrects the error of the modules before
    # it: -10% KL on pydocs-llama), off with GPTQ (no gain measured); docs/experiments, the 2026-12-03 GPTQ entry
    true_sequential: bool | None = _param(
        None,
        "GPTQ / GPTAQ: quantize a layer's modules in forward order, each on inputs computed with the ones "
        "before it already quantized (one more pass per stage: o, gate/up, down; default on with gptaq, off with "
        "gptq)",
    )


@dataclass(frozen=True)
class GPTAQParams(_Params):
    """Read by `gptaq`."""

    # fraction of the float-input correction W D H^-1 in GPTQ's target. None: 1.0 true-sequential, 0.25
    # otherwise (the best of each sweep in docs/experiments, the 2026-12-02 GPTAQ and 2026-12-03 GPTQ entries)
    gptaq_alpha: float | None = _param(
        None,
        "GPTAQ: fraction of the correction towards the float model's inputs (default 1.0 with "
        "--true-sequential, 0.25 without)",
    )
    gptaq_routers: bool = _param(
        True, "GPTAQ: refit MoE routers (kept in high precision) to the float model's logits (default on)"
    )


@dataclass(frozen=True)
class MoEParams(_Params):
    """Read by every calibration pass over a MoE layer (moe.ExpertList)."""

    # a MoE expert's input statistics (AWQ's mean |x| and loss, GPTQ's Hessian, GPTAQ's cross term) over every
    # calibration token, each token weighted by what the expert's error costs the block's output: "routed" =
    # its routing weight squared where the router chose the expert, plus for every token `moe_weight_floor`
    # times the mean routed weight squared (near misses; an expert the router never chose is calibrated on all
    # tokens alike); "uniform" = every token alike. The floor: docs/experiments, the 2026-12-03 routed-MoE entry
    moe_weighting: str = _param(
        "routed",
        "MoE experts: weight each calibration token in an expert's statistics by its routing weight "
        "squared plus --moe-weight-floor (routed, the default), or alike (uniform)",
        choices=MOE_WEIGHTINGS,
    )
    moe_weight_floor: float = _param(
        1e-3,
        "MoE experts, routed weighting: the weight of a token the router did not send, relative to the "
        "mean routed weight squared (default 0.001)",
        check=lambda v: (
            None
            if v > 0
            else "use a positive number (it keeps every token in an expert's statistics; 0.001 is the default)"
        ),
    )


@dataclass(frozen=True)
class PercentileParams(_Params):
    """Read by `percentile`."""

    percentile: float = _param(99.99, "activation amax percentile (percentile)")


@dataclass(frozen=True)
class CalibrationParams(_Params):
    """Read by the calibration of every layer, whatever its steps."""

    # True: each layer is calibrated on the outputs of the quantized layers before it; False: on the float
    # model's activations (one pass per layer instead of two, as ModelOpt does); None: True where a step fits
    # the weights to the layer's inputs (AWQ, GPTQ), False where only scales are observed (max, smoothquant:
    # the same KL either way on pydocs-llama, in half the time; docs/experiments, the 2026-12-02 wall-time entry)
    sequential: bool | None = _param(
        None,
        "calibrate each layer on the quantized layers' outputs or on the float model's (--no-sequential: "
        "one pass per layer, twice as fast); default: sequential for AWQ / GPTQ, not for max / smoothquant",
    )
    # dtype of the matrix products in calibration's forward passes: "auto" = the checkpoint's own (a BF16
    # model runs bf16 products with fp32 accumulation, as on a GPU; 5x faster on AMX CPUs), "float32", or
    # "bfloat16". Weights, statistics and every algorithm's own arithmetic stay fp32 whatever this is.
    calib_dtype: str = _param(
        "auto",
        "dtype of the calibration forward passes' matrix products (default auto: the checkpoint's, so a "
        "BF16 model runs bf16 products where the hardware has them; float32: exact)",
        choices=CALIB_DTYPES,
    )


PARAMS: tuple[type[_Params], ...] = (
    SmoothQuantParams,
    AWQParams,
    ClipParams,
    GPTQParams,
    GPTAQParams,
    MoEParams,
    PercentileParams,
    CalibrationParams,
)


@dataclass(frozen=True)
class AlgorithmParams(
    CalibrationParams,
    PercentileParams,
    MoEParams,
    GPTAQParams,
    GPTQParams,
    ClipParams,
    AWQParams,
    SmoothQuantParams,
):
    """Every step's parameters in one flat record (CLI flags / the `algorithm_params` key of a YAML recipe).

    The bases are PARAMS in reverse: a dataclass takes its fields from its last base first, so the fields
    run in PARAMS' order (SmoothQuant's first), as lowbit.json has always listed them."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ParamFlag:
    """The command-line flag of one AlgorithmParams field: `--sq-alpha`, or for a bool the pair
    `--gptq-act-order` / `--no-gptq-act-order`; unset flags leave the recipe's value."""

    name: str  # the field (the YAML key)
    type: type  # bool, int, float or str
    help: str
    choices: tuple[str, ...] = ()

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


def param_flags() -> tuple[ParamFlag, ...]:
    """A flag per AlgorithmParams field that has one, in field order."""
    hints = typing.get_type_hints(AlgorithmParams)
    return tuple(
        ParamFlag(f.name, _scalar(hints[f.name]), f.metadata["help"], tuple(f.metadata["choices"]))
        for f in dataclasses.fields(AlgorithmParams)
        if f.metadata["flag"]
    )


def _scalar(hint: Any) -> type:
    """float for `float` and `float | None`."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if args else hint


# --- steps ---------------------------------------------------------------------------------------------------


class Smoothing(Enum):
    """How a step smooths: per-channel scales folded from the activations into the weights."""

    SMOOTHQUANT = "smoothquant"  # s = amax_x^alpha / amax_w^(1 - alpha)
    AWQ = "awq"  # the grid point of mean|x|^a / mean|w|^(1 - a) of least output error


class WeightSearch(Enum):
    """How a step searches the weight scales after max."""

    CLIP = "clip"  # clip ratios by the Hessian-weighted output error (AWQ's clip search)
    MSE = "mse"  # clip ratios by the weight's own squared error


@dataclass(frozen=True)
class Step:
    """One algorithm step: what it does and what calibration must gather for it."""

    name: str
    help: str
    needs_data: bool = False  # runs only on calibration data (a forward loop)
    reads_hessian: bool = False  # every input's full Hessian E[x x^T] (else only the error report's rows)
    reads_absmean: bool = False  # each input channel's mean |x| (AWQ's activation importance)
    smooths: Smoothing | None = None
    weight_search: WeightSearch | None = None
    gptq: bool = False  # GPTQ replaces the weights
    float_reference: bool = False  # GPTAQ: the float model's activations kept beside the quantized ones
    samples_activations: bool = False  # activation amax from a sample of |x| (percentile)
    fits_weights: bool = False  # fits the weights to the layer's inputs: sequential calibration by default
    calibrates: bool = True  # False: no calibration, alone ('none': forwards only where a format needs them)
    params: tuple[type[_Params], ...] = ()  # the parameters it reads (besides CalibrationParams, MoEParams)


STEPS: dict[str, Step] = {
    s.name: s
    for s in (
        Step("max", "max scales: the weights' and the activations' max |x|"),
        Step(
            "smoothquant", "SmoothQuant: activation outliers migrated into the weights",
            needs_data=True, smooths=Smoothing.SMOOTHQUANT, params=(SmoothQuantParams,),
        ),
        Step(
            "awq_lite", "AWQ's scale search", needs_data=True, reads_hessian=True, reads_absmean=True,
            smooths=Smoothing.AWQ, fits_weights=True, params=(AWQParams,),
        ),
        Step(
            "awq_clip", "AWQ's clip search of the weight scales", needs_data=True, reads_hessian=True,
            weight_search=WeightSearch.CLIP, fits_weights=True, params=(ClipParams,),
        ),
        Step(
            "awq_full", "AWQ's scale search, then its clip search", needs_data=True, reads_hessian=True,
            reads_absmean=True, smooths=Smoothing.AWQ, weight_search=WeightSearch.CLIP, fits_weights=True,
            params=(AWQParams, ClipParams),
        ),
        Step(
            "gptq", "GPTQ", needs_data=True, reads_hessian=True, gptq=True, fits_weights=True,
            params=(GPTQParams,),
        ),
        Step(
            "gptaq", "GPTAQ: GPTQ towards the float model's outputs", needs_data=True, reads_hessian=True,
            gptq=True, float_reference=True, fits_weights=True, params=(GPTQParams, GPTAQParams),
        ),
        Step("mse", "weight scales of least squared error", weight_search=WeightSearch.MSE, params=(ClipParams,)),
        Step(
            "percentile", "activation amax as a percentile of |x|", needs_data=True, samples_activations=True,
            params=(PercentileParams,),
        ),
        Step("none", "no calibration", calibrates=False),
    )
}  # fmt: skip
ALGORITHM_STEPS = tuple(STEPS)
ALGORITHM_ALIASES = {"awq": "awq_lite", "sq": "smoothquant"}
ALGORITHM_EXAMPLES = ("awq+gptq", "awq_full+gptaq", "mse+gptq")  # for --help
ALGORITHMS = (*ALGORITHM_STEPS, "awq+gptq", "awq_full+gptq", "smoothquant+gptq", "mse+gptq")  # common ones


@dataclass(frozen=True)
class Algorithm:
    """The steps of an algorithm such as 'awq_full+gptq' (in the order given; they always run in the fixed
    order of calibrate.py) and what they ask of calibration, all steps together."""

    steps: tuple[Step, ...]

    @classmethod
    def parse(cls, name: str | Algorithm) -> Algorithm:
        """The algorithm called `name` (aliases resolved), or a LowbitError naming the closest one; checked: at
        most one smoothing method, one GPTQ, and 'none' alone."""
        if isinstance(name, Algorithm):
            return name
        if "+" not in name and ALGORITHM_ALIASES.get(name, name) not in STEPS:
            raise LowbitError(
                f"unknown algorithm {name!r}{closest(name, ALGORITHMS)}; choose one of {', '.join(ALGORITHMS)}"
            )
        steps = []
        for part in name.split("+"):
            step = ALGORITHM_ALIASES.get(part.strip(), part.strip())
            if step not in STEPS:
                raise LowbitError(
                    f"unknown algorithm step {step!r}{closest(step, ALGORITHM_STEPS)} in {name!r}; "
                    f"combine {', '.join(ALGORITHM_STEPS)} with '+' (e.g. awq+gptq)"
                )
            steps.append(STEPS[step])
        distinct = set(steps)
        if len({s.smooths for s in distinct if s.smooths is not None}) > 1:
            raise LowbitError(f"{name!r}: SmoothQuant and AWQ both smooth; choose one of them")
        if sum(s.gptq for s in distinct) > 1:
            raise LowbitError(f"{name!r}: GPTAQ is GPTQ with the float model's inputs; choose one of them")
        alone = next((s for s in distinct if not s.calibrates), None)
        if alone is not None and len(distinct) > 1:
            raise LowbitError(
                f"{name!r}: {alone.name!r} (no calibration) cannot be combined with other steps"
            )
        return cls(tuple(steps))

    def __str__(self) -> str:
        """The normalised name: 'awq+gptq' -> 'awq_lite+gptq'."""
        return "+".join(s.name for s in self.steps)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(s.name for s in self.steps)

    @property
    def needs_data(self) -> bool:
        return any(s.needs_data for s in self.steps)

    @property
    def reads_hessian(self) -> bool:
        return any(s.reads_hessian for s in self.steps)

    @property
    def reads_absmean(self) -> bool:
        return any(s.reads_absmean for s in self.steps)

    @property
    def smooths(self) -> Smoothing | None:
        return next((s.smooths for s in self.steps if s.smooths is not None), None)

    @property
    def weight_searches(self) -> frozenset[WeightSearch]:
        return frozenset(s.weight_search for s in self.steps if s.weight_search is not None)

    @property
    def gptq(self) -> bool:
        return any(s.gptq for s in self.steps)

    @property
    def float_reference(self) -> bool:
        return any(s.float_reference for s in self.steps)

    @property
    def samples_activations(self) -> bool:
        return any(s.samples_activations for s in self.steps)

    @property
    def fits_weights(self) -> bool:
        return any(s.fits_weights for s in self.steps)

    @property
    def calibrates(self) -> bool:
        """False for 'none': forward passes only where an activation format keeps calibrated statistics."""
        return all(s.calibrates for s in self.steps)

    @property
    def awq(self) -> bool:
        """Whether a step is AWQ's (its scale or its clip search): the unified HF format's NVFP4_AWQ."""
        return self.smooths is Smoothing.AWQ or WeightSearch.CLIP in self.weight_searches

    @property
    def params(self) -> tuple[type[_Params], ...]:
        """The parameter dataclasses the steps read, besides the calibration-wide ones."""
        return tuple(dict.fromkeys(p for s in self.steps for p in s.params))

    def sequential(self, params: AlgorithmParams) -> bool:
        """Whether each layer is calibrated on the quantized layers' outputs (AlgorithmParams.sequential)."""
        if params.sequential is not None:
            return params.sequential
        return self.fits_weights

    def true_sequential(self, params: AlgorithmParams) -> bool:
        """Whether GPTQ / GPTAQ quantizes a layer's modules stage by stage (AlgorithmParams.true_sequential)."""
        if params.true_sequential is not None:
            return params.true_sequential
        return self.float_reference and self.sequential(params)

    def gptaq_alpha(self, params: AlgorithmParams) -> float:
        """GPTAQ's share of the float-input correction (AlgorithmParams.gptaq_alpha)."""
        if params.gptaq_alpha is not None:
            return params.gptaq_alpha
        return 1.0 if self.true_sequential(params) else 0.25
