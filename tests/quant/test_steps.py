"""Algorithm steps as records: they answer what the step-name sets used to, and the parameters compose."""

import dataclasses
import itertools

import pytest

from lowbit.errors import LowbitError
from lowbit.quant.recipe import check_algorithm
from lowbit.quant.steps import (
    ALGORITHM_STEPS,
    ALGORITHMS,
    PARAMS,
    STEPS,
    Algorithm,
    AlgorithmParams,
    CalibrationParams,
    MoEParams,
    Smoothing,
    WeightSearch,
    param_flags,
)


def _old_answers(name: str, params: AlgorithmParams) -> dict[str, object]:
    """What calibrate.py, recipe.py, layerwise.py and export/hf.py computed from the step names before the
    records (the string sets, copied as they were)."""
    steps = frozenset(
        {"awq": "awq_lite", "sq": "smoothquant"}.get(s.strip(), s.strip()) for s in name.split("+")
    )
    sequential = (
        params.sequential
        if params.sequential is not None
        else bool(steps & {"awq_lite", "awq_clip", "awq_full", "gptq", "gptaq"})
    )
    true_sequential = (
        params.true_sequential if params.true_sequential is not None else "gptaq" in steps and sequential
    )
    alpha = params.gptaq_alpha if params.gptaq_alpha is not None else 1.0 if true_sequential else 0.25
    smooths = "smoothquant" if "smoothquant" in steps else "awq" if steps & {"awq_lite", "awq_full"} else None
    return {
        "needs_data": bool(
            steps & {"smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq", "gptaq", "percentile"}
        ),
        "reads_hessian": bool(steps & {"awq_lite", "awq_full", "awq_clip", "gptq", "gptaq"}),
        "reads_absmean": bool(steps & {"awq_lite", "awq_full"}),
        "smooths": smooths,
        "clip": bool(steps & {"awq_clip", "awq_full"}),
        "mse": "mse" in steps,
        "gptq": bool(steps & {"gptq", "gptaq"}),
        "float_reference": "gptaq" in steps,
        "samples_activations": "percentile" in steps,
        "calibrates": "none" not in steps,
        "awq": "awq" in check_algorithm(name),  # export/hf.py's NVFP4_AWQ test, on the normalised name
        "sequential": sequential,
        "true_sequential": true_sequential,
        "gptaq_alpha": alpha,
        "manifest_true_sequential": bool(steps & {"gptq", "gptaq"}) and true_sequential,
    }


def _new_answers(name: str, params: AlgorithmParams) -> dict[str, object]:
    a = Algorithm.parse(name)
    return {
        "needs_data": a.needs_data,
        "reads_hessian": a.reads_hessian,
        "reads_absmean": a.reads_absmean,
        "smooths": a.smooths.value if a.smooths is not None else None,
        "clip": WeightSearch.CLIP in a.weight_searches,
        "mse": WeightSearch.MSE in a.weight_searches,
        "gptq": a.gptq,
        "float_reference": a.float_reference,
        "samples_activations": a.samples_activations,
        "calibrates": a.calibrates,
        "awq": a.awq,
        "sequential": a.sequential(params),
        "true_sequential": a.true_sequential(params),
        "gptaq_alpha": a.gptaq_alpha(params),
        "manifest_true_sequential": a.gptq and a.true_sequential(params),
    }


def _valid_combinations() -> list[str]:
    names = [*ALGORITHMS, "awq", "sq", "sq+gptq", "awq+gptaq"]
    for pair in itertools.combinations(ALGORITHM_STEPS, 2):
        try:
            Algorithm.parse("+".join(pair))
        except LowbitError:
            continue
        names.append("+".join(pair))
    return names


PARAM_VARIANTS = [
    AlgorithmParams(sequential=s, true_sequential=t, gptaq_alpha=a)
    for s in (None, True, False)
    for t in (None, True, False)
    for a in (None, 0.5)
]


@pytest.mark.parametrize("name", _valid_combinations())
def test_the_records_answer_as_the_step_name_sets_did(name):
    for params in PARAM_VARIANTS:
        assert _new_answers(name, params) == _old_answers(name, params), (name, params)


def test_every_pair_of_steps_is_refused_exactly_where_it_was():
    for pair in itertools.combinations(ALGORITHM_STEPS, 2):
        found = frozenset(pair)
        refused = bool(
            ("smoothquant" in found and found & {"awq_lite", "awq_full"})
            or {"gptq", "gptaq"} <= found
            or "none" in found
        )
        try:
            Algorithm.parse("+".join(pair))
        except LowbitError:
            assert refused, pair
        else:
            assert not refused, pair


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("gptqq", "unknown algorithm 'gptqq' (did you mean 'gptq'?); choose one of " + ", ".join(ALGORITHMS)),
        (
            "awq_lit+gptq",
            "unknown algorithm step 'awq_lit' (did you mean 'awq_lite'?) in 'awq_lit+gptq'; combine "
            + ", ".join(ALGORITHM_STEPS)
            + " with '+' (e.g. awq+gptq)",
        ),
        ("smoothquant+awq", "'smoothquant+awq': SmoothQuant and AWQ both smooth; choose one of them"),
        ("sq+awq_full", "'sq+awq_full': SmoothQuant and AWQ both smooth; choose one of them"),
        ("gptq+gptaq", "'gptq+gptaq': GPTAQ is GPTQ with the float model's inputs; choose one of them"),
        ("none+max", "'none+max': 'none' (no calibration) cannot be combined with other steps"),
    ],
)
def test_bad_algorithms_keep_their_messages(name, message):
    with pytest.raises(LowbitError) as e:
        Algorithm.parse(name)
    assert str(e.value) == message


def test_the_normalised_name_resolves_aliases_in_order():
    assert str(Algorithm.parse("awq+gptq")) == check_algorithm("awq+gptq") == "awq_lite+gptq"
    assert check_algorithm("sq") == "smoothquant"
    assert check_algorithm(" gptq + awq_full") == "gptq+awq_full"
    assert Algorithm.parse(Algorithm.parse("gptaq")) == Algorithm.parse("gptaq")
    assert ALGORITHM_STEPS == tuple(STEPS) == (
        "max", "smoothquant", "awq_lite", "awq_clip", "awq_full", "gptq", "gptaq", "mse", "percentile", "none"
    )  # fmt: skip


def test_algorithm_params_keep_their_flat_keys_in_order_and_compose_the_parts():
    old_order = [
        "sq_alpha", "awq_grid", "clip_grid", "clip_min", "gptq_block_size", "gptq_damp", "gptq_act_order",
        "gptq_rounds", "true_sequential", "gptaq_alpha", "gptaq_routers", "moe_weighting", "moe_weight_floor",
        "percentile", "sequential", "calib_dtype",
    ]  # fmt: skip
    assert list(AlgorithmParams().to_dict()) == old_order
    assert [f.name for part in PARAMS for f in dataclasses.fields(part)] == old_order
    defaults = {"sq_alpha": 1.0, "awq_grid": 20, "clip_grid": 10, "clip_min": 0.5, "gptq_block_size": 128,
                "gptq_damp": 0.01, "gptq_act_order": True, "gptq_rounds": 4, "true_sequential": None,
                "gptaq_alpha": None, "gptaq_routers": True, "moe_weighting": "routed", "moe_weight_floor": 1e-3,
                "percentile": 99.99, "sequential": None, "calib_dtype": "auto"}  # fmt: skip
    assert AlgorithmParams().to_dict() == defaults
    assert all(f.metadata["help"] for f in dataclasses.fields(AlgorithmParams))
    read = {p for step in STEPS.values() for p in step.params} | {CalibrationParams, MoEParams}
    assert read == set(PARAMS)  # every parameter is read by a step or by every calibration


def test_each_part_checks_its_own_fields():
    from lowbit.quant.steps import GPTQParams

    with pytest.raises(LowbitError, match=r"^gptq_rounds 0: use 1 or more \(1 = GPTQ once, as published\)$"):
        GPTQParams(gptq_rounds=0)
    with pytest.raises(
        LowbitError,
        match=r"^unknown calib_dtype 'fp32' \(did you mean 'float32'\?\); use one of auto, float32, bfloat16$",
    ):
        AlgorithmParams(calib_dtype="fp32")
    with pytest.raises(LowbitError, match=r"^moe_weight_floor -1: use a positive number"):
        AlgorithmParams(moe_weight_floor=-1)


def test_flags_come_from_the_fields():
    flags = {f.name: f for f in param_flags()}
    assert set(flags) == {f.name for f in dataclasses.fields(AlgorithmParams)} - {"clip_grid", "clip_min"}
    assert flags["gptq_act_order"].type is bool and flags["true_sequential"].type is bool
    assert flags["gptaq_alpha"].type is float and flags["gptq_rounds"].type is int
    assert (
        flags["moe_weighting"].choices == ("routed", "uniform") and flags["sq_alpha"].option == "--sq-alpha"
    )
    assert Smoothing.AWQ is Algorithm.parse("awq_full").smooths
