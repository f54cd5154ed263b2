"""Calibrating one decoder layer: the algorithms of a recipe, run in a fixed order on the layer's real inputs.

1. statistics pass: the float layer runs the calibration batches; hooks gather each quantized Linear's
   input statistics (stats.py) and the activation quantizers observe their inputs;
2. smoothing (SmoothQuant or AWQ) of the family's smoothing groups, folded into the float weights;
3. weight scales: max, then AWQ's clip search (Hessian-weighted) or the MSE search;
4. GPTQ on the weights, with those scales fixed; GPTAQ (`gptaq`) towards the float model's outputs where
   the statistics pass also saw the float model's inputs of the same tokens (`reference_pass`);
5. activation scales: smoothing divides input channel j by s_j, so a per-tensor input amax becomes
   max_j(amax_j / s_j), exact from the per-channel statistics; only what that cannot cover (a smoothed V
   feeding a quantized KV cache, per-channel static inputs) takes a second pass over the data. After GPTQ
   the activation scales stay those of the float layer, as in the peers. "percentile" takes per-tensor
   activation amax as a percentile of |x| sampled in the last pass.

"mse" searches weight scales only: on LLM activations any clipping of the outlier channels costs far more
than it saves (docs/experiments, the 2026-11-23 calibration-algorithms entry), so activation amax stays the
max unless "percentile" is asked for.

Every quantized Linear gets an error report: its output error on the calibration inputs relative to its
output energy, `tr(D H D^T) / tr(W H W^T)`, for round-to-nearest with max scales ("before") and for what the
algorithm produced ("after"); weight-only data-free runs report the weight error instead.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lowbit.algorithms import gptq, routers, search, smoothing
from lowbit.algorithms.passes import ForwardLoop, LocalReducer, Pass, Reducer
from lowbit.algorithms.stats import CalibrationContext, InputStats, collect_inputs, row_output_errors
from lowbit.errors import LowbitError
from lowbit.formats.scaled import ScaleMap, fake_quant, scale_map
from lowbit.models import moe
from lowbit.models.families import Family, Smooth, expand_groups
from lowbit.quant.convert import (
    KV_QUANTIZERS,
    all_quantizers,
    check_calibrated,
    quant_linears,
    set_calibrating,
)
from lowbit.quant.linear import QuantLinear
from lowbit.quant.quantizer import STAT_NAMES, Quantizer
from lowbit.quant.steps import Algorithm, AlgorithmParams, Smoothing, WeightSearch

log = logging.getLogger(__name__)

REPORT_ROWS = 256  # tokens per batch in the Hessian when only the error report needs it


def needs_data(algorithm: str | Algorithm) -> bool:
    return Algorithm.parse(algorithm).needs_data


@dataclass
class LayerInfo:
    """What calibrate_layer needs to know about the layer besides its modules."""

    prefix: str
    family: Family | None
    num_heads: int | None = None  # attention heads and KV heads (for smoothing V into O with GQA)
    num_kv_heads: int | None = None
    storage_dtypes: dict[str, torch.dtype] | None = None  # param name -> dtype it is written in


def chain_fake_quant(w: Tensor, linear: QuantLinear) -> Tensor:
    """The weight chain applied with max scales taken from w itself."""
    for fmt in linear.spec.weight:
        w = fake_quant(w, fmt)
    return w


@torch.no_grad()
def calibrate_layer(
    layer: nn.Module,
    info: LayerInfo,
    algorithm: str | Algorithm,
    params: AlgorithmParams,
    forward_loop: ForwardLoop | None,
    reducer: Reducer | None = None,
) -> dict[str, dict[str, Any]]:
    """Calibrate the QuantLinears and K/V quantizers of `layer` (converted, float weights) in place with
    `algorithm` ('max', 'awq_full+gptq', ...) on the passes of `forward_loop` over the calibration data;
    `reducer` combines each pass's statistics with those of other processes' data (default: none,
    passes.LocalReducer). Returns {full module name: error report}."""
    steps = Algorithm.parse(algorithm)
    reducer = LocalReducer() if reducer is None else reducer
    linears = dict(quant_linears(layer))
    if not steps.calibrates:
        forward_loop = forward_loop if _static_activations(layer) else None
    if forward_loop is None:
        if steps.needs_data:
            raise LowbitError(
                f"{info.prefix or 'model'}: algorithm {str(algorithm)!r} needs calibration data; pass a forward loop"
            )
        return _calibrate_data_free(layer, linears, info, steps, params)
    sample = steps.samples_activations
    _set_sampling(layer, sample)
    moe_routers = _routers(layer, info) if steps.float_reference and params.gptaq_routers else {}
    derived = [n for n, lin in linears.items() if not sample and _derivable(lin.input_quantizer)]
    first = Pass(statistics=True, reference=steps.float_reference)
    rows = None if steps.reads_hessian else REPORT_ROWS
    with collect_inputs(linears, rows, steps.reads_absmean, first.context) as stats, \
            routers.record_targets(moe_routers, first.context) as router_fits, \
            _inputs_from_stats(linears, derived):  # fmt: skip
        _observe(layer, forward_loop, params, first)
    reducer.reduce(stats, _activation_quantizers(layer))  # this process's batches -> every process's
    _derive_input_stats(linears, stats, [n for n in derived if n in stats])
    report = {info.prefix + "." + n: {"before": _rel_error(_rtn(lin), lin.weight, stats[n])}
              for n, lin in linears.items() if n in stats}  # fmt: skip
    _report_routing(layer, info, report)
    smoothed = _smooth(layer, linears, stats, info, steps, params)
    repass = _rescale_activation_stats(layer, linears, stats, smoothed)
    _weight_scales(linears, stats, info, steps, params)
    tie_fused_scales(linears, info.family)
    if steps.float_reference and not any(st.cross is not None for st in stats.values()):
        log.warning("%s: gptaq without the float model's activations (whole-model calibration, or "
                    "--no-sequential) is gptq", info.prefix or "model")  # fmt: skip
    # GPTQ replaces the weights: it measures each one against the weight it started from (one Linear at a
    # time, no copy of the layer); the other steps change scales only. Activation scales stay those of the
    # float layer, as in the peers.
    after: dict[str, float] = {}
    if steps.gptq:
        alpha = steps.gptaq_alpha(params)
        if _staged(params, steps, stats):
            after = _gptq_in_stages(layer, linears, stats, info, params, alpha, forward_loop, reducer)
        else:
            after = _gptq(linears, stats, info, params, alpha)
    for n, lin in linears.items():
        if n in stats:
            entry = report[info.prefix + "." + n]
            if n in after:
                entry["after"] = after[n]
            else:
                entry["after"] = _rel_error(lin.weight_quantizer(lin.weight.float()), lin.weight, stats[n])
            entry["tokens"] = stats[n].n
    if repass:
        _reset_activation_stats(layer)
        _observe(layer, forward_loop, params, Pass())
        reducer.reduce({}, _activation_quantizers(layer))
    if sample:
        _activation_search(layer, params)
    _set_sampling(layer, False)
    tie_shared_inputs(linears, info.family)
    check_calibrated(layer, info.prefix)
    if router_fits:  # GPTAQ aims the routers at the float model's logits too, on the quantized layer's inputs
        fitted = routers.refit(moe_routers, router_fits, forward_loop, layer, params.gptq_damp, info.storage_dtypes)
        report.update({f"{info.prefix}.{n}" if info.prefix else n: r for n, r in fitted.items()})
    return report


def reads_inputs_again(
    layer: nn.Module, info: LayerInfo, algorithm: str | Algorithm, params: AlgorithmParams
) -> bool:
    """Whether calibrate_layer may run its forward loop more than once on this converted layer: a second pass
    after smoothing (activation statistics that the rescaled per-channel maxima cannot give: a smoothed V
    feeding a quantized KV cache, static inputs other than per-tensor), or GPTAQ's router refit. When not,
    the caller may replace each batch's inputs by the layer's outputs during the statistics pass."""
    steps = Algorithm.parse(algorithm)
    if steps.float_reference and params.gptaq_routers and _routers(layer, info):
        return True
    if steps.gptq and steps.true_sequential(params):
        return True
    if steps.smooths is None:
        return False
    kv = any(n.rpartition(".")[2] in KV_QUANTIZERS for n, _ in all_quantizers(layer))
    static = any(
        q is not None and not q.fmt.dynamic and not _derivable(q)
        for q in (lin.input_quantizer for _, lin in quant_linears(layer))
    )
    return kv or static


def _routers(layer: nn.Module, info: LayerInfo) -> dict[str, nn.Module]:
    moe_facts = info.family.moe if info.family is not None else None
    return routers.find_routers(layer, moe_facts.router) if moe_facts is not None else {}


@contextlib.contextmanager
def reference_pass(layer: nn.Module, context: CalibrationContext) -> Iterator[None]:
    """A forward of the float layer on the float model's activations (GPTAQ's reference) inside a pass whose
    hooks read `context`: the input hooks keep each Linear's input for the next forward of the same tokens;
    quantizer statistics and routed token counts stay as they were. Linears that GPTQ already replaced
    compute with the weight they had before (`QuantLinear.float_weight`)."""
    done = [lin for _, lin in quant_linears(layer) if lin.float_weight is not None]
    modes = [lin.calibrating for lin in done]
    try:
        for lin in done:
            lin.calibrating = True
        with kept_statistics(layer), context.reference_inputs():
            yield
    finally:
        for lin, mode in zip(done, modes, strict=True):
            lin.calibrating = mode


class StageInputsSeen(Exception):
    """Raised when a forward under `stopping_after` reaches the end of its module."""


@contextlib.contextmanager
def stopping_after(module: nn.Module | None) -> Iterator[None]:
    """Inside: every forward of the layer ends (StageInputsSeen, which the calibration loop catches batch by
    batch) once `module` has run; a pass for the inputs of one stage needs nothing after its last module."""
    if module is None:
        yield
        return

    def stop(*_: Any) -> None:
        raise StageInputsSeen

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def kept_statistics(layer: nn.Module) -> Iterator[None]:
    """Forward passes inside leave every quantizer's statistics and the routed token counts as they were."""
    quantizers = [q for _, q in all_quantizers(layer)]
    saved = [({n: t.clone() for n, t in q.stats().items()}, None if q.samples is None else len(q.samples))
             for q in quantizers]  # fmt: skip
    routed = [(m, list(m.routed)) for _, m in moe.expert_lists(layer)]
    try:
        yield
    finally:
        for q, (kept, n_samples) in zip(quantizers, saved, strict=True):
            for stat in STAT_NAMES:
                setattr(q, stat, kept.get(stat))
            if n_samples is not None and q.samples is not None:
                del q.samples[n_samples:]
        for m, counts in routed:
            m.routed = counts


def expert_floor(params: AlgorithmParams) -> float | None:
    """The floor of each token's weight in a MoE expert's statistics (moe.ExpertList), None: uniform."""
    return params.moe_weight_floor if params.moe_weighting == "routed" else None


def _observe(
    layer: nn.Module, forward_loop: ForwardLoop, params: AlgorithmParams, pass_: Pass,
    quantized: list[QuantLinear] | None = None,
) -> None:  # fmt: skip
    """One calibration pass: quantizers observe, Linears compute in float (those in `quantized` quantized),
    every MoE expert sees every token (the layer's output stays the routed one; its statistics weight the
    tokens by routing, `params.moe_weighting`, through the pass's context)."""
    set_calibrating(layer, True)
    moe.set_calibrating(layer, True, expert_floor(params), pass_.context.token_weights)
    for lin in quantized or []:
        lin.calibrating = False
    try:
        forward_loop(layer, pass_)
    finally:
        set_calibrating(layer, False)
        moe.set_calibrating(layer, False)


def _report_routing(layer: nn.Module, info: LayerInfo, report: dict[str, dict[str, Any]]) -> None:
    """Tokens the router sent to each expert, in each expert Linear's report; experts that got none are
    named in a warning (they are calibrated on every token, at equal weight, so their scales are set)."""
    for name, counts in moe.routed_report(layer).items():
        full = f"{info.prefix}.{name}" if info.prefix else name
        for key, entry in report.items():
            rest = key[len(full) + 1 :] if key.startswith(full + ".") else None
            if rest is not None and rest.partition(".")[0].isdigit():
                entry["routed_tokens"] = counts[int(rest.partition(".")[0])]
        idle = [str(e) for e, c in enumerate(counts) if c == 0]
        if idle:
            log.warning(
                "%s: expert%s %s routed no calibration tokens (of %d routings); calibrated on every token at equal "
                "weight, so their scales are set; more varied calibration data would route to them",
                full, "s" if len(idle) > 1 else "", ", ".join(idle), sum(counts),
            )  # fmt: skip


def tie_shared_inputs(linears: dict[str, QuantLinear], family: Family | None) -> None:
    """Give the Linears whose inputs engines quantize with one scale (a MoE block's experts) the max of
    their static per-tensor input amaxes (or NVFP4 global amaxes)."""
    if family is None or not family.shared_inputs:
        return
    for group in expand_groups(family.shared_inputs, linears, per_expert=False):
        qs = [q for n in group if (q := linears[n].input_quantizer) is not None]
        _share_tensor_amax(qs)


def _calibrate_data_free(
    layer: nn.Module, linears: dict[str, QuantLinear], info: LayerInfo, steps: Algorithm,
    params: AlgorithmParams,
) -> dict[str, dict[str, Any]]:  # fmt: skip
    report: dict[str, dict[str, Any]] = {}
    before = {n: _weight_error(_rtn(lin), lin.weight) for n, lin in linears.items()}
    _weight_scales(linears, {}, info, steps, params)
    tie_fused_scales(linears, info.family)
    for n, lin in linears.items():
        after = _weight_error(lin.weight_quantizer(lin.weight.float()), lin.weight)
        report[info.prefix + "." + n] = {"weight_before": before[n], "weight_after": after}
    check_calibrated(layer, info.prefix)
    return report


def _rtn(linear: QuantLinear) -> Tensor:
    return chain_fake_quant(linear.weight.detach().float(), linear)


def _rel_error(wq: Tensor, w: Tensor, stats: InputStats) -> float:
    w = w.detach().float()
    err, energy = stats.output_error(wq.float() - w), stats.output_error(w)
    if err is None or energy is None:
        return _weight_error(wq, w)
    return float(err / energy.clamp(min=1e-30))


def _weight_error(wq: Tensor, w: Tensor) -> float:
    w = w.detach().float()
    return float((wq.float() - w).pow(2).sum() / w.pow(2).sum().clamp(min=1e-30))


# --- smoothing ----------------------------------------------------------------------------------------------


def _derivable(q: Quantizer | None) -> bool:
    """Whether an input quantizer's static statistics are a function of its Linear's per-channel input amax:
    a symmetric per-tensor amax is its max, NVFP4's dynamic blocks need only the global amax, the same max."""
    if q is None or not q.fmt.symmetric:
        return False
    return (q.fmt.granularity == "tensor" and not q.fmt.dynamic) or (q.fmt.global_scale and q.fmt.dynamic)


@contextlib.contextmanager
def _inputs_from_stats(linears: dict[str, QuantLinear], names: list[str]) -> Iterator[None]:
    """The statistics pass's input hooks see every input already: `names` skip their own observation."""
    for n in names:
        linears[n].observe_input = False
    try:
        yield
    finally:
        for n in names:
            linears[n].observe_input = True


def _derive_input_stats(linears: dict[str, QuantLinear], stats: dict[str, InputStats], names: list[str]) -> bool:
    """Set the input statistics of `names` from their per-channel input amax (exact: a max of maxima); True if
    some static statistic cannot be derived that way and needs a pass of its own."""
    repass = False
    for name in names:
        q = linears[name].input_quantizer
        if q is None:
            continue
        st_amax = stats[name].amax
        assert st_amax is not None
        if _derivable(q) and q.fmt.dynamic:
            q.global_amax = st_amax.max().reshape(())
        elif _derivable(q):
            q.amax = st_amax.max().reshape(())
        elif not q.fmt.dynamic:
            repass = True
    return repass


def _rescale_activation_stats(
    layer: nn.Module, linears: dict[str, QuantLinear], stats: dict[str, InputStats], smoothed: list[Smooth]
) -> bool:
    """Set the input amax of smoothed linears from their rescaled per-channel statistics; True if some
    activation statistic cannot be derived that way and needs another pass."""
    repass = _derive_input_stats(linears, stats, [n for group in smoothed for n in group.linears])
    for group in smoothed:
        if group.heads and any(n.rpartition(".")[2] in KV_QUANTIZERS for n, _ in all_quantizers(layer)):
            repass = True  # V itself was rescaled
    return repass


def _smooth(
    layer: nn.Module, linears: dict[str, QuantLinear], stats: dict[str, InputStats], info: LayerInfo,
    steps: Algorithm, params: AlgorithmParams,
) -> list[Smooth]:  # fmt: skip
    method = steps.smooths
    if method is None:
        return []
    if info.family is None or not info.family.smooth:
        log.warning(
            "%s: no smoothing groups known for this architecture; %s skipped", info.prefix, method.value
        )
        return []
    smoothed: list[Smooth] = []
    names = [n for n, _ in layer.named_modules()]
    for group in (g for pattern in info.family.smooth for g in pattern.expand(names)):
        members = [linears.get(n) for n in group.linears]
        if any(m is None for m in members) or any(n not in stats for n in group.linears):
            continue  # part of the group is not quantized (or never ran)
        mods = [m for m in members if m is not None]
        own = [stats[n] for n in group.linears]  # experts weighted by routing: one InputStats each
        distinct = list({id(st): st for st in own}.values())
        st = distinct[0]
        if any(o.source is None or o.source != st.source for o in distinct[1:]):
            log.warning("%s: %s do not read one tensor; not smoothed", info.prefix, ", ".join(group.linears))
            continue
        if method is Smoothing.SMOOTHQUANT and all(m.input_quantizer is None for m in mods):
            continue  # weight-only: nothing to migrate into
        prev = layer.get_submodule(group.prev)
        cmap = _channel_map(group, prev, mods[0], info)
        if cmap is False:
            continue
        cmap_t = cmap if isinstance(cmap, Tensor) else None
        n_prev = _out_channels(prev)
        also = [n for n in group.also if n in names]
        # a router (kept in high precision) reads this input too: powers of two keep its fold exact in the
        # stored dtype, so it routes every token as before (a rounded router weight flips near-ties)
        exact = bool(also)
        if method is Smoothing.SMOOTHQUANT:
            assert st.amax is not None
            a = smoothing.pool(st.amax, cmap_t, n_prev, "amax")
            w = smoothing.pool(smoothing.weight_amax([m.weight for m in mods]), cmap_t, n_prev, "amax")
            s = smoothing.smoothquant_scales(a, w, params.sq_alpha)
            s = smoothing.power_of_two(s) if exact else s
        else:
            s = _awq_scale(mods, own, cmap_t, n_prev, params, exact)
        extra = [layer.get_submodule(n) for n in also]
        smoothing.fold(prev, [*mods, *extra], s, cmap_t, norm_offset=info.family.norm_offset)
        _round_to_storage(layer, info, [group.prev, *group.linears, *also])
        for o in distinct:
            o.scale_inputs(smoothing.expand(s, cmap_t))
        smoothed.append(group)
    return smoothed


def _awq_scale(
    mods: list[QuantLinear], stats: list[InputStats], cmap: Tensor | None, n_prev: int, params: AlgorithmParams,
    power_of_two: bool = False,
) -> Tensor:  # fmt: skip
    """AWQ's scale for Linears reading one input, `stats[i]` the statistics of `mods[i]` (the same object for
    all but routing-weighted experts, whose mean |x| is then the weighted mean over all of them); with
    `power_of_two` every candidate is rounded to powers of two."""
    distinct = list({id(st): st for st in stats}.values())
    of: dict[int, Tensor] = {}
    for st in distinct:  # formed once per input (q/k/v share one)
        h = st.hessian
        assert h is not None
        of[id(st)] = h
    hessians = [of[id(st)] for st in stats]
    g = mods[0].spec.weight[0].block_size
    abssum = torch.stack([st.abssum for st in distinct if st.abssum is not None]).sum(0)
    x_mean = smoothing.pool(abssum / max(sum(st.mass for st in distinct), 1e-30), cmap, n_prev, "mean")
    w_mean = smoothing.pool(smoothing.weight_importance([m.weight for m in mods], g), cmap, n_prev, "mean")
    candidates = smoothing.awq_candidates(x_mean, w_mean, params.awq_grid)
    if power_of_two:
        candidates = [(label, smoothing.power_of_two(c)) for label, c in candidates]

    def quantize(w: Tensor) -> Tensor:
        return chain_fake_quant(w, mods[0])

    s, label, _ = smoothing.awq_search([m.weight for m in mods], hessians, candidates, quantize, cmap)
    log.debug("AWQ scale %s", label)
    return s


def _channel_map(group: Smooth, prev: nn.Module, first: QuantLinear, info: LayerInfo) -> Tensor | bool:
    """True: channels match one to one; a map for grouped-query V -> O; False: cannot fold."""
    n_prev = _out_channels(prev)
    if n_prev == first.in_features:
        return True
    if not group.heads or not info.num_heads or not info.num_kv_heads:
        return False
    heads, kv = info.num_heads, info.num_kv_heads
    hd = first.in_features // heads
    if heads % kv or hd * kv != n_prev or hd * heads != first.in_features:
        return False
    c = torch.arange(first.in_features, device=first.weight.device)
    return (c // hd) // (heads // kv) * hd + c % hd


def _out_channels(module: nn.Module) -> int:
    weight = module.weight
    assert isinstance(weight, Tensor)
    return int(weight.shape[0])


def _round_to_storage(layer: nn.Module, info: LayerInfo, modules: list[str]) -> None:
    """Round changed float weights to the dtype they are written in, so that the checkpoint computes exactly
    what calibration saw."""
    if not info.storage_dtypes:
        return
    for mod in modules:
        for pname, p in layer.get_submodule(mod).named_parameters(recurse=False):
            dt = info.storage_dtypes.get(f"{mod}.{pname}")
            if dt is not None and dt != p.dtype:
                p.data = p.data.to(dt).to(p.dtype)


# --- weights -----------------------------------------------------------------------------------------------


def _weight_scales(
    linears: dict[str, QuantLinear], stats: dict[str, InputStats], info: LayerInfo, steps: Algorithm,
    params: AlgorithmParams,
) -> None:  # fmt: skip
    clip = WeightSearch.CLIP in steps.weight_searches
    ratios = search.clip_ratios(params.clip_grid, params.clip_min)
    no_clip = info.family.no_clip if info.family else ()
    for name, lin in linears.items():
        lin.calibrate_weight()
        # only the clip search reads H (a report-only statistic would build it from its rows for nothing)
        h = stats[name].hessian if clip and name in stats and name not in no_clip else None
        if h is not None:
            _set_first_amax(lin, search.search_weight_amax(lin.weight, lin.spec.weight[0], ratios, h))
        elif WeightSearch.MSE in steps.weight_searches:
            _set_first_amax(lin, search.search_weight_amax(lin.weight, lin.spec.weight[0], ratios))


def tie_fused_scales(linears: dict[str, QuantLinear], family: Family | None) -> None:
    """Give the Linears that engines fuse (q/k/v, gate/up) one per-tensor weight scale per chain stage: the
    max of their amaxes (FP8 per-tensor, NVFP4's global scale, W4A8's FP8 level). Later stages of the chain
    are recalibrated on the result. The fake-quantized model then computes what the fused engine GEMM does."""
    if family is None:
        return
    for group in expand_groups(family.fused, linears, per_expert=True):
        members = [linears[n] for n in group if n in linears]
        if len(members) < 2:
            continue
        if len({m.spec.weight for m in members}) > 1:
            log.warning("%s use different weight formats; engines that fuse them cannot load this", group)
            continue
        for stage in range(len(members[0].spec.weight)):
            if _share_tensor_amax([m.weight_quantizer.quantizers()[stage] for m in members]):
                for m in members:
                    _recalibrate_after(m, stage)


def _share_tensor_amax(qs: list[Quantizer]) -> bool:
    """Give quantizers of one format the max of their per-tensor statistic (`Stats.tensor_amax`: a per-tensor
    amax, NVFP4's global amax); False where the format has none or some quantizer lacks it."""
    if len(qs) < 2 or len({q.fmt for q in qs}) > 1:
        return False
    fmt = qs[0].fmt
    values = [q.stat_values().tensor_amax(fmt) for q in qs]
    if any(v is None or v.numel() != 1 for v in values):
        return False
    shared = torch.stack([v.reshape(()) for v in values if v is not None]).max()
    for q, v in zip(qs, values, strict=True):
        assert v is not None
        q.load_stats(q.stat_values().with_tensor_amax(fmt, shared.reshape(v.shape).clone()).to_dict())
    return True


def _recalibrate_after(lin: QuantLinear, stage: int) -> None:
    """Recalibrate the weight chain's stages after `stage` on the output of the stages up to it."""
    qs = lin.weight_quantizer.quantizers()
    w = lin.weight.detach()
    for q in qs[: stage + 1]:
        w = q(w)
    for q in qs[stage + 1 :]:
        q.amax = q.global_amax = q.amin = None
        q.observe(w)
        w = q(w)
    lin._qweight = None


def _set_first_amax(lin: QuantLinear, amax: Tensor) -> None:
    """Give the first weight quantizer `amax` and recalibrate the rest of the chain on its output."""
    lin.weight_quantizer.quantizers()[0].amax = amax
    _recalibrate_after(lin, 0)


def _gptq(
    linears: dict[str, QuantLinear], stats: dict[str, InputStats], info: LayerInfo, params: AlgorithmParams,
    alpha: float, measure: dict[str, InputStats] | None = None,
) -> dict[str, float]:  # fmt: skip
    """GPTQ (or GPTAQ, `alpha` its share of the float-input correction) on every Linear with a Hessian;
    {name: its output error against its weight before, on the inputs of `measure` (default `stats`)}."""
    measure = stats if measure is None else measure
    errors = {}
    for name, lin in linears.items():
        h = stats[name].hessian if name in stats else None
        if h is None:
            continue
        cross = stats[name].cross  # GPTAQ: the float model's inputs of these tokens were seen
        target = lin.weight if cross is None else gptq.asymmetric_target(
            lin.weight, h, cross, params.gptq_damp, alpha
        )

        q = _codes_and_scales(lin, target, h, params, f"{info.prefix}.{name}")
        before = lin.weight.detach()  # keeps the weight GPTQ started from until its error is measured
        dt = (info.storage_dtypes or {}).get(f"{name}.weight")
        lin.weight.data = (q if dt is None else q.to(dt)).to(lin.weight.dtype)  # what the checkpoint stores
        lin._qweight = None
        errors[name] = _rel_error(lin.weight_quantizer(lin.weight.float()), before, measure[name])
        del before, target, q
    return errors


def _staged(params: AlgorithmParams, steps: Algorithm, stats: dict[str, InputStats]) -> bool:
    """True-sequential GPTQ as asked; by default where GPTAQ has the float model's inputs (its float target
    is what corrects the stages before; whole-model or non-sequential GPTAQ is GPTQ, staged for nothing)."""
    if params.true_sequential is not None:
        return params.true_sequential
    return steps.true_sequential(params) and any(st.cross is not None for st in stats.values())


def _gptq_in_stages(
    layer: nn.Module, linears: dict[str, QuantLinear], stats: dict[str, InputStats], info: LayerInfo,
    params: AlgorithmParams, alpha: float, forward_loop: ForwardLoop, reducer: Reducer,
) -> dict[str, float]:  # fmt: skip
    """GPTQ stage by stage in the layer's forward order (`_stages`): the first stage on the statistics pass's
    inputs, each later one on the inputs of one more pass in which the stages before it compute quantized
    (their input quantizers and GPTQ's weights) while the statistics of every quantizer stay as they were.
    With GPTAQ each such pass runs the float layer (the weights before GPTQ) on the float model's inputs
    first, so that a stage's target also corrects the error of the stages before it in this layer. Errors
    are reported on the statistics pass's inputs, as RTN's."""
    paired = any(st.cross is not None for st in stats.values())
    experts = [name + "." for name, _ in moe.expert_lists(layer)]
    stages = _stages({n: st for n, st in stats.items() if st.hessian_sum is not None or st.rows}, experts)
    done: list[QuantLinear] = []
    errors: dict[str, float] = {}
    try:
        for k, stage in enumerate(stages):
            group = {n: linears[n] for n in stage}
            current = stats
            if k:
                stage_pass = Pass(reference=paired, stop_after=group[stage[-1]])
                hooks = collect_inputs(group, None, absmean=False, context=stage_pass.context)
                with hooks as current, kept_statistics(layer):
                    _observe(layer, forward_loop, params, stage_pass, quantized=done)
                reducer.reduce(current, [])
            for lin in group.values():
                lin.float_weight = lin.weight.detach().clone() if paired else None
            errors.update(_gptq(group, current, info, params, alpha, measure=stats))
            done.extend(group.values())
    finally:
        for lin in done:
            lin.float_weight = None
    return errors


def _stages(stats: dict[str, InputStats], experts: list[str]) -> list[list[str]]:
    """The Linears of `stats` (in the order the statistics pass first called them) in stages: Linears that read
    one input (q/k/v, gate/up, an expert's gate/up) or the same Linear of each expert under one of the
    `experts` prefixes (every expert's down_proj) are one stage."""
    stages: list[list[str]] = []
    where: dict[object, int] = {}
    for name, st in stats.items():
        prefix = next((p for p in experts if name.startswith(p)), None)
        same = name if prefix is None else prefix + re.sub(r"^\d+\.", "#.", name.removeprefix(prefix))
        keys = (id(st), same)
        i = next((where[k] for k in keys if k in where), len(stages))
        if i == len(stages):
            stages.append([])
        stages[i].append(name)
        for key in keys:
            where.setdefault(key, i)
    return stages


def _codes_and_scales(lin: QuantLinear, target: Tensor, h: Tensor, params: AlgorithmParams, name: str) -> Tensor:
    """GPTQ's weight for `target` on `lin`'s calibrated scales. For one-stage symmetric group formats (INT4,
    NVFP4, MXFP4) the group scales are then refitted to GPTQ's codes (search.refit_group_amax), and
    `params.gptq_rounds` - 1 more rounds run GPTQ on the refitted scales and refit again; each row keeps the
    round with its least output error tr((Q - W~) H (Q - W~)^T) (GPTQ's rows are independent), so a round
    never makes a row worse."""
    best: Tensor | None = None
    # the Hessian's order and inverse factor are the same in every round (only the scales change)
    factor = gptq.factor_hessian(h, params.gptq_damp, params.gptq_act_order, name)
    for _ in range(params.gptq_rounds):
        maps = _scale_maps(lin)

        def quantize_columns(cols: Tensor, idx: Tensor, maps: list[ScaleMap] = maps) -> Tensor:
            for m in maps:
                cols = m.fake_quant(cols, idx)
            return cols

        q, _ = gptq.gptq_quantize(
            target, h, quantize_columns, block_size=params.gptq_block_size, damp=params.gptq_damp,
            act_order=params.gptq_act_order, name=name, factor=factor,
        )  # fmt: skip
        refit = _refit_scales(lin, target, q, h)
        if refit is None:
            return q
        q, amax = refit
        err = row_output_errors(q - target.float(), h.float())
        if best is None:
            best, best_amax, best_err = q, amax, err
            continue
        better = err < best_err
        best[better], best_amax[better], best_err = q[better], amax[better], torch.minimum(err, best_err)
        lin.weight_quantizer.quantizers()[0].amax = best_amax.clone()
        if not bool(better.any()):
            break
    assert best is not None
    lin.weight_quantizer.quantizers()[0].amax = best_amax
    return best


def _refit_scales(lin: QuantLinear, target: Tensor, q: Tensor, h: Tensor) -> tuple[Tensor, Tensor] | None:
    """(the weight on refitted scales, those scales as amax): GPTQ's codes `q` with each row's group scales
    refitted to them (search.refit_group_amax) towards GPTQ's `target`, which the weight quantizer now holds;
    None where that does not apply (formats other than one-stage symmetric groups)."""
    qs = lin.weight_quantizer.quantizers()
    fmt = qs[0].fmt
    if len(qs) != 1 or fmt.granularity != "group" or not fmt.symmetric or qs[0].amax is None:
        return None
    qs[0].amax, refitted = search.refit_group_amax(target, q, fmt, qs[0].amax, qs[0].global_amax, h)
    return refitted, qs[0].amax.clone()


def _scale_maps(lin: QuantLinear) -> list[ScaleMap]:
    """Each chain stage's scales, from the calibrated statistics, expanded to the weight's shape."""
    maps = []
    w = lin.weight.detach().float()
    for q in lin.weight_quantizer.quantizers():
        maps.append(scale_map(w, q.fmt, q.amax, q.global_amax, q.amin))
        w = q(w)
    return maps


# --- activations -------------------------------------------------------------------------------------------


def _static_activations(layer: nn.Module) -> bool:
    """Whether any activation quantizer keeps calibrated statistics (dynamic-only formats need no data)."""
    return any(
        (q.needs_block_amax or q.fmt.global_scale) and ".weight_quantizer" not in n
        for n, q in all_quantizers(layer)
    )


def _activation_quantizers(layer: nn.Module) -> list[Any]:
    return [
        q for n, q in all_quantizers(layer)
        if ".weight_quantizer" not in n and (n.endswith("input_quantizer") or n.rpartition(".")[2] in KV_QUANTIZERS)
    ]  # fmt: skip


def _reset_activation_stats(layer: nn.Module) -> None:
    for q in _activation_quantizers(layer):
        q.amax = q.global_amax = q.amin = None
        if q.samples is not None:
            q.samples = []


def _set_sampling(layer: nn.Module, on: bool) -> None:
    for q in _activation_quantizers(layer):
        per_tensor = q.fmt.granularity == "tensor" and not q.fmt.dynamic and q.fmt.symmetric
        q.samples = [] if on and per_tensor else None


def _activation_search(layer: nn.Module, params: AlgorithmParams) -> None:
    for q in _activation_quantizers(layer):
        if q.samples:
            q.amax = search.activation_amax(torch.cat(q.samples), q.fmt, "percentile", params.percentile, [])
