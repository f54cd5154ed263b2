"""The algorithms' maths as small pure functions: SmoothQuant, AWQ, GPTQ, the scale searches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.algorithms import gptq, search, smoothing
from lowbit.algorithms.stats import CalibrationContext, InputStats, collect_inputs, output_error
from lowbit.errors import LowbitError
from lowbit.formats.scaled import FP8_TENSOR, INT4_G32, INT4_G128, NVFP4, fake_quant, scale_map


def _correlated_inputs(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(n, k, generator=g) @ mix
    return x * torch.linspace(0.2, 5.0, k)  # some channels much larger: outliers


def test_smoothquant_leaves_the_float_output_unchanged():
    torch.manual_seed(0)
    norm = nn.RMSNorm(64)
    norm.weight.data = torch.rand(64) + 0.5
    linears = [nn.Linear(64, 32, bias=False), nn.Linear(64, 48, bias=False)]
    x = torch.randn(10, 64) * torch.linspace(0.1, 20, 64)
    before = [lin(norm(x)) for lin in linears]
    act = norm(x).abs().amax(0)
    s = smoothing.smoothquant_scales(act, smoothing.weight_amax([lin.weight for lin in linears]), 0.5)
    smoothing.fold(norm, linears, s)
    for lin, ref in zip(linears, before, strict=True):
        torch.testing.assert_close(lin(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_folding_into_a_gemma_norm_scales_one_plus_weight():
    """Gemma's RMSNorm multiplies by (1 + w): the fold gives w' = (1 + w) / s - 1, output unchanged."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    torch.manual_seed(0)
    norm = GemmaRMSNorm(64)
    norm.weight.data = torch.rand(64) - 0.5
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(10, 64) * torch.linspace(0.1, 20, 64)
    before = linear(norm(x))
    s = torch.rand(64) * 3 + 0.2
    smoothing.fold(norm, [linear], s, norm_offset=1.0)
    torch.testing.assert_close(linear(norm(x)), before, rtol=1e-5, atol=1e-5)
    smoothing.fold(norm, [linear], s)  # folding as into a plain norm would change it
    assert not torch.allclose(linear(norm(x)), before, rtol=1e-3, atol=1e-3)


def test_folding_into_a_previous_linear_with_grouped_heads_is_exact():
    torch.manual_seed(0)
    heads, kv, hd = 4, 2, 8
    v = nn.Linear(32, kv * hd, bias=True)
    o = nn.Linear(heads * hd, 32, bias=False)
    c = torch.arange(heads * hd)
    cmap = (c // hd) // (heads // kv) * hd + c % hd
    x = torch.randn(5, 32)
    ref = o(v(x)[:, cmap])  # each q head reads its kv head's values
    s = torch.rand(kv * hd) + 0.5
    smoothing.fold(v, [o], s, cmap)
    torch.testing.assert_close(o(v(x)[:, cmap]), ref, rtol=1e-5, atol=1e-5)


def test_awq_with_alpha_zero_is_round_to_nearest():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = _correlated_inputs(512, 256)
    h = x.t() @ x / len(x)
    cands = smoothing.awq_candidates(x.abs().mean(0), smoothing.weight_importance([w], 128), grid=1)
    assert [label for label, _ in cands] == ["x^0.00"]
    s, _, losses = smoothing.awq_search([w], h, cands, lambda t: fake_quant(t, INT4_G128))
    assert torch.equal(s, torch.ones(256))
    assert losses[0] == pytest.approx(float(output_error(fake_quant(w, INT4_G128) - w, h)), rel=1e-6)


def test_awq_search_lowers_the_output_error_on_outlier_channels():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = torch.randn(2048, 256, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.2, 5.0, 256)
    x[:, :4] *= 20  # a few salient channels, the case AWQ is made for
    h = x.t() @ x / len(x)
    cands = smoothing.awq_candidates(x.abs().mean(0), smoothing.weight_importance([w], 128), grid=10)
    _, label, losses = smoothing.awq_search([w], h, cands, lambda t: fake_quant(t, INT4_G128))
    assert label != "x^0.00" and min(losses) < 0.99 * losses[0]


def _column_quantizer(w, fmt):
    m = scale_map(w, fmt)
    return lambda cols, idx: m.fake_quant(cols, idx)


@pytest.mark.parametrize("fmt", [INT4_G128, INT4_G32, NVFP4])
def test_gptq_with_identity_hessian_is_round_to_nearest(fmt):
    torch.manual_seed(0)
    w = torch.randn(32, 256)
    q, damp = gptq.gptq_quantize(w, torch.eye(256), _column_quantizer(w, fmt), act_order=False)
    assert damp == 0.01
    assert torch.equal(q, fake_quant(w, fmt))


def _gptq_on_correlated_inputs(fmt, act_order):
    """(w, H, GPTQ's weight) for a random weight on correlated inputs with outlier channels."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = _correlated_inputs(2048, 256)
    h = x.t() @ x / len(x)
    q, _ = gptq.gptq_quantize(w, h, _column_quantizer(w, fmt), act_order=act_order)
    return w, h, q


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_lowers_the_output_error_on_correlated_inputs(act_order):
    w, h, q = _gptq_on_correlated_inputs(INT4_G128, act_order)
    rtn = fake_quant(w, INT4_G128)
    assert output_error(q - w, h) < 0.85 * output_error(rtn - w, h)
    # every column stays on its group's grid (static groups): quantizing again changes nothing
    assert torch.equal(scale_map(w, INT4_G128).fake_quant(q), q)


def test_gptq_raises_the_damping_when_cholesky_fails_and_errors_when_it_cannot():
    w = torch.randn(8, 16)
    h = torch.kron(torch.eye(8), torch.tensor([[1.0, 2.0], [2.0, 1.0]]))  # eigenvalues 3 and -1, mean diag 1
    q, damp = gptq.gptq_quantize(w, h, _column_quantizer(w, INT4_G32.replace(group_size=16)), damp=0.01)
    assert damp >= 1.0 and torch.isfinite(q).all()
    with pytest.raises(LowbitError, match="singular"):
        gptq.gptq_quantize(
            w, torch.full((16, 16), float("nan")), _column_quantizer(w, INT4_G32.replace(group_size=16))
        )


def test_clip_search_never_raises_amax_and_lowers_the_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    w[0, 3] = 12.0  # an outlier that max calibration lets dominate its group
    ratios = search.clip_ratios(10, 0.5)
    amax = search.search_weight_amax(w, INT4_G128, ratios)
    full = w.abs().reshape(64, 2, 128).amax(-1)
    assert (amax <= full + 1e-7).all() and (amax < full).any()
    err = (fake_quant(w, INT4_G128, amax=amax) - w).pow(2).sum()
    assert err < (fake_quant(w, INT4_G128) - w).pow(2).sum()


def test_hessian_weighted_clip_search_lowers_the_output_error():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x = _correlated_inputs(2048, 256)
    h = x.t() @ x / len(x)
    amax = search.search_weight_amax(w, NVFP4, search.clip_ratios(10, 0.5), h)
    gamax = w.abs().amax()
    clipped = fake_quant(w, NVFP4, amax=amax, global_amax=gamax)
    assert output_error(clipped - w, h) < output_error(fake_quant(w, NVFP4) - w, h)


def test_activation_amax_percentile_and_mse_stay_below_the_max():
    torch.manual_seed(0)
    x = torch.randn(100_000)
    x[0] = 60.0
    p = search.activation_amax(x.abs(), FP8_TENSOR, "percentile", 99.9, [1.0])
    assert 3.0 < float(p) < 4.0
    m = search.activation_amax(x, FP8_TENSOR, "mse", 99.9, search.clip_ratios(40, 0.05))
    assert float(m) <= 60.0


def test_shared_inputs_share_statistics_and_hessian_is_the_second_moment():
    torch.manual_seed(0)
    a, b, c = nn.Linear(16, 8), nn.Linear(16, 4), nn.Linear(8, 2)
    xs = [torch.randn(3, 5, 16) for _ in range(2)]
    with collect_inputs({"a": a, "b": b, "c": c}, None) as stats:
        for x in xs:
            c(a(x) + b(x)[..., :1])
    assert stats["a"] is stats["b"] and stats["c"] is not stats["a"]
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    torch.testing.assert_close(stats["a"].hessian, flat.t() @ flat / len(flat))
    assert stats["a"].n == 30
    torch.testing.assert_close(stats["a"].absmean, flat.abs().mean(0))


def test_one_input_under_other_token_weights_keeps_its_source():
    """Experts reading the block's one input each under their own routing weights get their own statistics
    with one `source` (smoothing folds one scale into all of them); a Linear on another tensor gets another."""
    torch.manual_seed(0)
    up0, up1, down = nn.Linear(16, 8), nn.Linear(16, 8), nn.Linear(8, 4)
    x = torch.randn(5, 16)
    context = CalibrationContext()
    with collect_inputs({"up0": up0, "up1": up1, "down": down}, None, context=context) as stats:
        with context.token_weights.weighting(torch.rand(5)):
            down(up0(x))
        with context.token_weights.weighting(torch.rand(5)):
            up1(x)
    assert stats["up0"] is not stats["up1"]
    assert stats["up0"].source == stats["up1"].source != stats["down"].source
    assert all(st.source is not None for st in stats.values())


@pytest.mark.parametrize("hessian_rows", [None, 40])
def test_weighted_rows_count_as_repeated_rows(hessian_rows):
    """A MoE expert's statistics weight each token (routing weight^2 + floor): integer weights give what the
    rows repeated that many times give, except amax, which stays over every row (a weight-0 row too)."""
    torch.manual_seed(0)
    x, ref = torch.randn(6, 8), torch.randn(6, 8)
    w = torch.tensor([2.0, 1.0, 0.0, 3.0, 1.0, 2.0])
    rep = torch.repeat_interleave(torch.arange(6), w.long())
    weighted, repeated = InputStats(8, hessian_rows), InputStats(8, hessian_rows)
    weighted.add(x, w)
    weighted.add_cross(x, ref, w)
    repeated.add(x[rep])
    repeated.add_cross(x[rep], ref[rep])
    for key in ("hessian", "absmean", "cross"):
        torch.testing.assert_close(getattr(weighted, key), getattr(repeated, key))
    torch.testing.assert_close(
        weighted.output_error(torch.ones(2, 8)), repeated.output_error(torch.ones(2, 8))
    )
    assert torch.equal(weighted.amax, x.abs().amax(0)) and not torch.equal(
        weighted.amax, x[rep].abs().amax(0)
    )
    assert weighted.n == 6 and weighted.mass == 9.0


def test_input_stats_follow_smoothing():
    x = torch.randn(50, 8)
    s = torch.rand(8) + 0.5
    st, ref = InputStats(8), InputStats(8)
    st.add(x)
    ref.add(x / s)
    st.scale_inputs(s)
    torch.testing.assert_close(st.hessian, ref.hessian)
    torch.testing.assert_close(st.amax, ref.amax)


@pytest.mark.parametrize("fmt", [INT4_G128, NVFP4])
def test_refitted_group_scales_keep_the_codes_and_never_raise_a_rows_error(fmt):
    w, h, q = _gptq_on_correlated_inputs(fmt, act_order=True)
    gamax = w.abs().amax() if fmt.global_scale else None
    amax = search.search_weight_amax(w, fmt, [1.0])  # the max scales GPTQ quantized with
    refit, q2 = search.refit_group_amax(w, q, fmt, amax, gamax, h)
    assert torch.equal(fake_quant(q2, fmt, amax=refit, global_amax=gamax), q2)  # on its own grid
    old = ((q - w) @ h * (q - w)).sum(1)
    new = ((q2 - w) @ h * (q2 - w)).sum(1)
    assert (new <= old * (1 + 1e-5)).all()
    if fmt is INT4_G128:  # fp32 scales: the least-squares fit lowers the error of (nearly) every row
        assert new.sum() < 0.995 * old.sum() and (new < old).float().mean() > 0.9
        codes = lambda t, a: t.reshape(64, 2, 128) / (a / 7)[..., None]  # noqa: E731
        assert torch.allclose(codes(q2, refit), codes(q, amax), atol=1e-4)  # same codes, new scales


def test_gptaq_target_is_the_weight_without_input_error_and_fits_the_float_outputs():
    """GPTAQ: GPTQ towards W + W D H^-1 lowers ||Q x_q - W x_f|| below GPTQ on W, when x_q = x_f + error."""
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    x_f = _correlated_inputs(4096, 256)
    x_q = x_f + 0.3 * _correlated_inputs(4096, 256, seed=1)  # the error of the quantized layers before
    h = x_q.t() @ x_q / len(x_q)
    cross = (x_f - x_q).t() @ x_q / len(x_q)
    assert torch.equal(gptq.asymmetric_target(w, h, torch.zeros_like(h), 0.01), w)
    target = gptq.asymmetric_target(w, h, cross, 0.01)
    quantize = _column_quantizer(w, INT4_G128)
    sym, _ = gptq.gptq_quantize(w, h, quantize)
    asym, _ = gptq.gptq_quantize(target, h, quantize)

    def err(q):
        return (x_q @ q.t() - x_f @ w.t()).pow(2).mean()

    assert err(asym) < 0.9 * err(sym)
    assert torch.equal(scale_map(w, INT4_G128).fake_quant(asym), asym)  # on the weight's own grid


def test_collect_inputs_gathers_the_cross_statistic_of_a_reference_pass():
    lin = nn.Linear(8, 4, bias=False)
    x_f, x_q = torch.randn(16, 8), torch.randn(16, 8)
    context = CalibrationContext()
    with collect_inputs({"lin": lin}, None, context=context) as stats:
        with context.reference_inputs():
            lin(x_f)
        lin(x_q)
        lin(x_q.clone())  # no reference before it: counted in H only
    st = stats["lin"]
    assert st.n == 32 and st.n_cross == 16
    torch.testing.assert_close(st.cross, (x_f - x_q).t() @ x_q / 16)
    torch.testing.assert_close(st.hessian, 2 * x_q.t() @ x_q / 32)


def test_a_reference_pass_leaves_the_quantizer_statistics_as_they_were():
    from lowbit.algorithms.calibrate import reference_pass
    from lowbit.formats.scaled import FP8_TENSOR
    from lowbit.quant.linear import QuantLinear, QuantSpec

    lin = QuantLinear(nn.Linear(8, 4, bias=False), QuantSpec((INT4_G32.replace(group_size=8),), FP8_TENSOR))
    lin.calibrating = True
    lin(torch.ones(2, 8))
    with reference_pass(lin, CalibrationContext()):
        lin(10 * torch.ones(2, 8))  # larger inputs: a leak would raise the input amax
    assert float(lin.input_quantizer.amax) == 1.0


def test_router_refit_is_the_ridge_least_squares_fit_to_the_float_logits():
    """A router reading x_q = x_f + error gets the weight that maps x_q closest to the float logits W x_f."""
    from lowbit.algorithms import routers

    class Block(nn.Module):  # a router in a block, as transformers' MoE blocks hold it
        def __init__(self) -> None:
            super().__init__()
            self.gate = nn.Linear(32, 6, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gate(x)

    torch.manual_seed(0)
    block = Block()
    w = block.gate.weight.detach().clone()
    x_f = [_correlated_inputs(512, 32, seed=s) for s in range(3)]
    noise = torch.randn(32, 32) / 32**0.5
    x_q = [x + 0.3 * x @ noise for x in x_f]  # a systematic (linear) input error, which a fit can undo
    found = routers.find_routers(block, "gate")
    assert list(found) == ["gate"]
    context = CalibrationContext()
    with routers.record_targets(found, context) as fits:
        for x in x_f:
            with context.reference_inputs():
                block(x)
            block(x + 1.0)  # the quantized model's own forward: no target recorded
    assert [t.shape for t in fits["gate"].targets] == [(512, 6)] * 3
    report = routers.refit(found, fits, lambda m, _: [m(x) for x in x_q], block, damp=0.0)
    xq, z = torch.cat(x_q), torch.cat(x_f) @ w.t()
    exact = torch.linalg.lstsq(xq, z).solution.t()
    torch.testing.assert_close(block.gate.weight, exact, rtol=1e-3, atol=1e-3)
    before = (xq @ w.t() - z).pow(2).sum() / z.pow(2).sum()
    after = (xq @ block.gate.weight.detach().t() - z).pow(2).sum() / z.pow(2).sum()
    assert report["gate"]["tokens"] == 3 * 512
    assert report["gate"]["before"] == pytest.approx(float(before), rel=1e-3)
    assert report["gate"]["after"] == pytest.approx(float(after), rel=1e-2, abs=1e-6)
    assert after < 0.01 * before


def test_report_statistics_keep_rows_until_a_hessian_is_smaller_and_measure_the_same_error():
    """With hessian_rows (the error report only), a wide input keeps its sampled rows instead of the in x in
    Hessian while they are fewer than in_features; tr(D H D^T) is the same either way."""
    torch.manual_seed(0)
    delta = torch.randn(16, 64)
    batches = [torch.randn(40, 64) for _ in range(4)]
    st, full = InputStats(64, hessian_rows=20), InputStats(64)
    s = torch.rand(64) + 0.5
    for i, x in enumerate(batches):
        st.add(x)
        full.add(x[torch.linspace(0, 39, 20).long()])
        assert (st.hessian_sum is None) == (20 * (i + 1) < 64), i  # rows for 3 batches, then the Hessian
        torch.testing.assert_close(st.output_error(delta), output_error(delta, full.hessian))
        torch.testing.assert_close(st.hessian, full.hessian)
        if i == 1:  # smoothing's rescale, in the rows phase
            st.scale_inputs(s)
            full.scale_inputs(s)
            torch.testing.assert_close(st.output_error(delta), output_error(delta, full.hessian))


@pytest.mark.parametrize("fmt", [INT4_G32, NVFP4, FP8_TENSOR])
def test_gptq_rounds_never_raise_a_rows_error_and_stay_on_the_grid(fmt):
    """More rounds of GPTQ codes then refitted group scales: every row's output error is at most the first
    round's, and the weight lies on the scales the quantizer keeps. Formats without refitted scales (FP8 per
    tensor) have nothing to alternate: one round."""
    from lowbit.algorithms.calibrate import _codes_and_scales
    from lowbit.algorithms.stats import row_output_errors
    from lowbit.quant.linear import QuantLinear, QuantSpec
    from lowbit.quant.recipe import AlgorithmParams

    torch.manual_seed(0)
    x = _correlated_inputs(512, 128)
    h = x.t() @ x / x.shape[0]
    base = nn.Linear(128, 24, bias=False)
    base.weight.data = torch.randn(24, 128) * torch.linspace(0.5, 2.0, 128)
    result = {}
    for rounds in (1, 6):
        lin = QuantLinear(nn.Linear(128, 24, bias=False), QuantSpec((fmt,)))
        lin.weight.data = base.weight.data.clone()
        lin.calibrate_weight()
        q = _codes_and_scales(lin, lin.weight, h, AlgorithmParams(gptq_rounds=rounds), "test")
        quantizer = lin.weight_quantizer.quantizers()[0]
        assert torch.equal(fake_quant(q, fmt, amax=quantizer.amax, global_amax=quantizer.global_amax), q)
        result[rounds] = row_output_errors(q - base.weight, h)
    if fmt.granularity == "group":
        assert (result[6] <= result[1]).all() and result[6].sum() < 0.97 * result[1].sum()
    else:
        assert torch.equal(result[6], result[1])
