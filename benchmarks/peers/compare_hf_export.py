"""lowbit's unified-HF export (`lowbit export --format hf`) against ModelOpt 0.47.0's, tensor by tensor.

Runs in lowbit's venv and never imports modelopt. The references come from modelopt_export_reference.py (run in the
ModelOpt venv): <ref>/<cfg>/{model.safetensors, hf_quant_config.json, config.json, calib_state.pt}. For each config
this script

1. quantizes the same tiny BF16 Llama (<ref>/tiny-llama) with lowbit's in-process API on the same calibration
   token ids (calib_state.pt's calib_input_ids, 4 x [2, 64] -> [8, 64]), with `sequential=False` so that
   activations are calibrated on the float model as ModelOpt does, and exports it with lowbit.export.export;
2. compares the structure: files, hf_quant_config.json, config.json's quantization_config (JSON diffs), tensor
   names / dtypes / shapes. ModelOpt's `*.pre_quant_scale` (AWQ / SmoothQuant) are listed apart: lowbit folds
   them into the preceding norm / Linear, so they have no counterpart by design;
3. decodes both exports' quantized weights to float with the decoders below (the same decoder for both sides)
   and reports per tensor the max |difference| in quantization steps and the fraction of elements that differ.

Step unit, per element: the grid spacing of the coarser of the two exports (larger local scale), taken at the
smaller of the two magnitudes: for INT formats the scale itself; for FP8 / FP4 elements scale x the spacing of the
E4M3 / E2M1 grid just above that magnitude. Two neighbouring grid points are then exactly 1 step apart.
W4A8: the unit is the INT4 group scale (the first level).

For the max-calibrated configs the goal is "same dequantized weights within one step": PASS / FAIL. The AWQ /
SmoothQuant configs use different smoothing in the two tools (and ModelOpt keeps pre_quant_scale for o_proj /
down_proj), so their value columns are information only; the `*@max` rows compare lowbit `--algorithm max` against
ModelOpt's INT4_AWQ_CFG / W4A8_AWQ_BETA_CFG with algorithm "max" (reference configs int4_max / w4a8_max).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/peers/compare_hf_export.py [--ref /tmp/modelopt-ref]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch
from safetensors import safe_open

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "src"))

from lowbit.algorithms.layerwise import quantize_checkpoint  # noqa: E402
from lowbit.export import api as export_api  # noqa: E402
from lowbit.quant.recipe import preset  # noqa: E402

# row -> (lowbit preset, kv cache, algorithm override, ModelOpt reference dir, weights must match within 1 step)
RUNS: dict[str, tuple[str, str | None, str | None, str, bool]] = {
    "fp8": ("fp8", None, None, "fp8", True),
    "fp8_kv": ("fp8", "fp8", None, "fp8_kv", True),
    "int4_awq": ("int4_awq", None, None, "int4_awq", False),
    "int4_awq@max": ("int4_awq", None, "max", "int4_max", True),
    "w4a8_awq": ("w4a8_awq", None, None, "w4a8_awq", False),
    "w4a8_awq@max": ("w4a8_awq", None, "max", "w4a8_max", True),
    "nvfp4": ("nvfp4", None, None, "nvfp4", True),
    "nvfp4_kv": ("nvfp4", "fp8", None, "nvfp4_kv", True),
    "nvfp4_wo": ("nvfp4_wo", None, None, "nvfp4_wo", True),
    "fp8_pc_pt": ("fp8_pc_pt", None, None, "fp8_pc_pt", True),
    "int8_sq": ("int8_sq", None, None, "int8_sq", False),
    "int8_wo": ("int8_wo", None, None, "int8_wo", True),
    "mxfp8": ("mxfp8", None, None, "mxfp8", True),
}
# what the comparison shows and why (checked by hand on the run of 0.47.0 references; see the report)
NOTES = {
    "fp8_bf16_division": "ModelOpt computes fp8(weight_bf16 / weight_scale) with the quotient rounded to bf16 "
    "first (double rounding); lowbit divides in fp32. Where the scales agree, 1-4% of elements differ by exactly "
    "one E4M3 step; recomputing both ways from the float weights reproduces each export bit for bit.",
    "fp8_fused_scale_tying": "lowbit gives q/k/v and gate/up one per-tensor FP8 weight scale (the max), what vLLM's "
    "requantize_with_max_scale does at load; ModelOpt 0.47 keeps each member's own scale for FP8 (it ties them "
    "for NVFP4 weight_scale_2 / W4A8 weight_scale_2 / input_scale). Those tensors differ everywhere, but both "
    "sides are correct roundings of one weight (max_rtn_ratio <= 1).",
    "input_scale": "activation amax: lowbit calibrates in fp32, ModelOpt in bf16: input / k / v scales differ by "
    "< 1%.",
    "pre_quant_scale": "lowbit folds AWQ / SmoothQuant scales into the preceding norm or Linear (v_proj / up_proj "
    "rows for o_proj / down_proj); ModelOpt keeps *.pre_quant_scale for o_proj / down_proj (AWQ) or all Linears "
    "(SmoothQuant), and writes pre_quant_scale: true in hf_quant_config for every AWQ algo, even with max "
    "calibration and no such tensor.",
}
IGNORED_FILES = {"calib_state.pt", "summary.json", "error.txt"}

# ------------------------------------------------------------------------------------------------- decoders
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def e4m3_spacing(mag: torch.Tensor) -> torch.Tensor:
    """Spacing of the E4M3 grid just above |v| (subnormals 2^-9)."""
    e = torch.floor(torch.log2(mag.clamp(min=2.0**-6)))
    return torch.exp2(e - 3)


def e2m1_spacing(mag: torch.Tensor) -> torch.Tensor:
    return torch.where(mag < 2, 0.5, torch.where(mag < 4, 1.0, 2.0))


def int_spacing(mag: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(mag)


SPACING = {"int": int_spacing, "e4m3": e4m3_spacing, "e2m1": e2m1_spacing}


def unpack_int4_dim0(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out/2, in] -> int [out, in]: row 2r in the low nibble, 2r+1 in the high, two's complement."""
    b = packed.to(torch.int16)
    lo, hi = b & 0xF, (b >> 4) & 0xF
    lo = torch.where(lo >= 8, lo - 16, lo)
    hi = torch.where(hi >= 8, hi - 16, hi)
    return torch.stack([lo, hi], dim=1).reshape(-1, packed.shape[1]).float()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [out, in/2] -> float [out, in]: element 2j in the low nibble (sign << 3 | magnitude index)."""
    b = packed.to(torch.int16)
    codes = torch.stack([b & 0xF, (b >> 4) & 0xF], dim=-1).reshape(packed.shape[0], -1)
    mag = E2M1_VALUES[(codes & 7).long()]
    return torch.where(codes >= 8, -mag, mag)


def expand_cols(s: torch.Tensor, n: int) -> torch.Tensor:
    """[out, in/g] -> [out, in]."""
    return s.repeat_interleave(n // s.shape[-1], dim=-1)


def decode(algo: str, t: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(dequantized weight, per-element local scale, element grid) of one quantized Linear of an export."""
    w = t["weight"]
    if algo in ("FP8", "FP8_PER_CHANNEL_PER_TOKEN"):
        v = w.float()
        s = t["weight_scale"].float()
        s = s.reshape(-1, 1).expand_as(v) if s.numel() > 1 else s.expand_as(v)
        return v * s, s, "e4m3"
    if algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        v = w.float()
        s = t["weight_scale"].float().reshape(-1, 1).expand_as(v)
        return v * s, s, "int"
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        v = unpack_int4_dim0(w)
        s = expand_cols(t["weight_scale"].float(), v.shape[1])
        deq = v * s
        if algo == "W4A8_AWQ":
            # the engine (TensorRT-LLM W4A8 GEMM, and ModelOpt's two-quantizer fake quant) computes
            # fp8(int4 * weight_scale / weight_scale_2) * weight_scale_2
            s2 = t["weight_scale_2"].float()
            deq = (deq / s2).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s2
        return deq, s, "int"
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        v = unpack_e2m1(w)
        s = expand_cols(t["weight_scale"].float(), v.shape[1]) * t["weight_scale_2"].float()
        return v * s, s, "e2m1"
    if algo == "MXFP8":
        v = w.float()
        s = expand_cols(torch.exp2(t["weight_scale"].float() - 127), v.shape[1])
        return v * s, s, "e4m3"
    raise ValueError(f"no decoder for quant_algo {algo}")


def compare_weights(algo: str, lb: dict[str, torch.Tensor], mo: dict[str, torch.Tensor]) -> dict[str, Any]:
    d_lb, s_lb, grid = decode(algo, lb)
    d_mo, s_mo, _ = decode(algo, mo)
    scale = torch.maximum(s_lb, s_mo)
    mag = torch.minimum(d_lb.abs(), d_mo.abs()) / scale
    step = scale * SPACING[grid](mag)
    diff = (d_lb - d_mo).abs()
    in_steps = diff / step
    # each side's own round-to-nearest bound |x - q| <= s * spacing(|q| / s) / 2: where the local scales differ,
    # two correct roundings of the same x lie within the sum of the two half steps (ratio <= 1)
    half = 0.5 * (s_lb * SPACING[grid](d_lb.abs() / s_lb) + s_mo * SPACING[grid](d_mo.abs() / s_mo))
    rtn_ratio = diff / half
    differ = diff > 0
    ref_norm = float(d_mo.norm()) or 1.0
    worst = int(in_steps.argmax())
    return {
        "max_diff_steps": float(in_steps.max()),
        "frac_differ": float(differ.float().mean()),
        "n_over_1_step": int((in_steps > 1 + 1e-6).sum()),
        "max_rtn_ratio": float(rtn_ratio.max()),
        "scale_equal_frac": float((s_lb == s_mo).float().mean()),
        "rel_l2": float((d_lb - d_mo).norm()) / ref_norm,
        "scale_max_rel_diff": float(((s_lb - s_mo).abs() / s_mo).max()),
        "worst": {
            "index": list(divmod(worst, d_lb.shape[1])),
            "lowbit": float(d_lb.flatten()[worst]),
            "modelopt": float(d_mo.flatten()[worst]),
            "step": float(step.flatten()[worst]),
        },
    }


# ------------------------------------------------------------------------------------------------- structure
def json_diff(a: Any, b: Any, path: str = "") -> list[str]:
    """Differences a (lowbit) -> b (ModelOpt) as 'path: lowbit=... modelopt=...' lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            p = f"{path}.{k}" if path else str(k)
            if k not in b:
                out.append(f"{p}: only lowbit = {json.dumps(a[k])}")
            elif k not in a:
                out.append(f"{p}: only modelopt = {json.dumps(b[k])}")
            else:
                out += json_diff(a[k], b[k], p)
        return out
    if a != b:
        return [f"{path}: lowbit={json.dumps(a)} modelopt={json.dumps(b)}"]
    return []


def read_export(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():  # noqa: SIM118 - safe_open has no __iter__
                out[k] = sf.get_tensor(k)
    return out


def files_of(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file() and p.name not in IGNORED_FILES)


def describe(t: torch.Tensor) -> str:
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


def members(tensors: dict[str, torch.Tensor], module: str) -> dict[str, torch.Tensor]:
    """{suffix: tensor} of one module's own tensors (weight, weight_scale, input_scale, ...)."""
    n = len(module) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(module + ".") and "." not in k[n:]}


def scalar_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(((a - b).abs() / b.abs().clamp(min=1e-30)).max())


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32}[a.element_size()]
    return torch.equal(a.contiguous().view(view), b.contiguous().view(view))


# ------------------------------------------------------------------------------------------------- one run
def run_lowbit(row: str, ref: Path, work: Path, model_dir: Path) -> tuple[Path, float]:
    name, kv, algo, ref_cfg, _ = RUNS[row]
    state = torch.load(ref / ref_cfg / "calib_state.pt", weights_only=False, map_location="cpu")
    calib = torch.cat(list(state["calib_input_ids"]), dim=0)
    recipe = preset(name).with_params(sequential=False)
    if algo:
        recipe = recipe.with_algorithm(algo)
    if kv:
        recipe = recipe.with_kv_cache(kv)
    ckpt, out = work / row / "ckpt", work / row / "export"
    t0 = time.perf_counter()
    quantize_checkpoint(model_dir, recipe, ckpt, calib, overwrite=True, progress=False)
    export_api.export(ckpt, "hf", out, export_api.ExportOptions(overwrite=True, progress=False))
    return out, time.perf_counter() - t0


def compare(row: str, lb_dir: Path, mo_dir: Path) -> dict[str, Any]:
    _, _, _, _, must_match = RUNS[row]
    r: dict[str, Any] = {"lowbit_export": str(lb_dir), "modelopt_export": str(mo_dir), "checked": must_match}
    f_lb, f_mo = files_of(lb_dir), files_of(mo_dir)
    r["files_only_lowbit"] = sorted(set(f_lb) - set(f_mo))
    r["files_only_modelopt"] = sorted(set(f_mo) - set(f_lb))
    hq_lb = json.loads((lb_dir / "hf_quant_config.json").read_text())
    hq_mo = json.loads((mo_dir / "hf_quant_config.json").read_text())
    r["hf_quant_config_diff"] = json_diff(hq_lb, hq_mo)
    cfg_lb = json.loads((lb_dir / "config.json").read_text())
    cfg_mo = json.loads((mo_dir / "config.json").read_text())
    r["quantization_config_diff"] = json_diff(
        cfg_lb.get("quantization_config"), cfg_mo.get("quantization_config"), "quantization_config"
    )
    r["config_other_diff"] = json_diff(
        {k: v for k, v in cfg_lb.items() if k != "quantization_config"},
        {k: v for k, v in cfg_mo.items() if k != "quantization_config"},
    )
    t_lb, t_mo = read_export(lb_dir), read_export(mo_dir)
    pqs = sorted(k for k in set(t_mo) - set(t_lb) if k.endswith(".pre_quant_scale"))
    r["pre_quant_scale_only_modelopt"] = pqs
    r["tensors_only_modelopt"] = sorted(set(t_mo) - set(t_lb) - set(pqs))
    r["tensors_only_lowbit"] = sorted(set(t_lb) - set(t_mo))
    r["dtype_shape_diff"] = {
        k: f"lowbit {describe(t_lb[k])} modelopt {describe(t_mo[k])}"
        for k in sorted(set(t_lb) & set(t_mo))
        if t_lb[k].dtype != t_mo[k].dtype or t_lb[k].shape != t_mo[k].shape
    }
    algo = hq_mo["quantization"]["quant_algo"]
    if hq_lb["quantization"]["quant_algo"] != algo:
        r["error"] = f"quant_algo lowbit {hq_lb['quantization']['quant_algo']} modelopt {algo}"
        return r
    linears = sorted(k[: -len(".weight_scale")] for k in t_mo if k.endswith(".weight_scale"))
    weights: dict[str, Any] = {}
    for lin in linears:
        sub, sub_mo = members(t_lb, lin), members(t_mo, lin)
        if "weight" not in sub or f"{lin}.weight" in r["dtype_shape_diff"]:
            weights[lin] = {"error": "missing or different dtype/shape in lowbit's export"}
            continue
        w = compare_weights(algo, sub, sub_mo)
        w["codes_equal"] = bits_equal(sub["weight"], sub_mo["weight"])
        w["weight_scale_equal"] = bits_equal(sub["weight_scale"], sub_mo["weight_scale"])
        weights[lin] = w
    r["weights"] = weights
    scalars: dict[str, Any] = {}
    for k in sorted(set(t_lb) & set(t_mo)):
        if t_mo[k].numel() == 1 and k.rsplit(".", 1)[-1] in (
            "input_scale",
            "weight_scale_2",
            "k_scale",
            "v_scale",
            "weight_scale",
        ):
            scalars[k] = {
                "lowbit": float(t_lb[k]),
                "modelopt": float(t_mo[k]),
                "rel": scalar_rel(t_lb[k], t_mo[k]),
            }
    r["scalars"] = scalars
    plain = [
        k
        for k in sorted(set(t_lb) & set(t_mo))
        if k not in scalars
        and not any(k == f"{lin}.{s}" for lin in linears for s in ("weight", "weight_scale"))
    ]
    r["plain_tensors_not_bit_equal"] = [k for k in plain if not bits_equal(t_lb[k], t_mo[k])]
    wv = [w for w in weights.values() if "max_diff_steps" in w]
    r["max_diff_steps"] = max((w["max_diff_steps"] for w in wv), default=math.nan)
    r["mean_frac_differ"] = sum(w["frac_differ"] for w in wv) / max(len(wv), 1)
    r["max_rel_l2"] = max((w["rel_l2"] for w in wv), default=math.nan)
    structure_ok = not (
        r["files_only_lowbit"]
        or r["files_only_modelopt"]
        or r["tensors_only_modelopt"]
        or r["tensors_only_lowbit"]
        or r["dtype_shape_diff"]
    )
    r["structure_ok"] = structure_ok
    # within one step where the local scales agree; where they differ (lowbit's fused-scale tying), both sides
    # must be correct roundings of one weight (max_rtn_ratio <= 1)
    ok = [
        w["max_diff_steps"] <= 1 + 1e-6 if w["scale_equal_frac"] == 1.0 else w["max_rtn_ratio"] <= 1 + 1e-6
        for w in wv
    ]
    r["scale_differs"] = sorted(k for k, w in weights.items() if w.get("scale_equal_frac", 1.0) < 1.0)
    r["failing_tensors"] = sorted(
        k
        for (k, w), good in zip(
            [(k, w) for k, w in weights.items() if "max_diff_steps" in w], ok, strict=True
        )
        if not good
    )
    if must_match:
        r["verdict"] = "PASS" if structure_ok and len(wv) == len(linears) and all(ok) else "FAIL"
    else:
        r["verdict"] = "info" if structure_ok else "STRUCT-DIFF"
    return r


# ------------------------------------------------------------------------------------------------- report
def print_row_details(row: str, r: dict[str, Any]) -> None:
    print(f"\n=== {row}  (lowbit {r['lowbit_export']} vs ModelOpt {r['modelopt_export']})")
    if r.get("error"):
        print(f"  ERROR {r['error']}")
    for key in ("files_only_lowbit", "files_only_modelopt", "tensors_only_lowbit", "tensors_only_modelopt"):
        if r.get(key):
            print(f"  {key}: {r[key]}")
    if r.get("pre_quant_scale_only_modelopt"):
        print(
            f"  ModelOpt pre_quant_scale without counterpart (lowbit folds the smoothing): "
            f"{len(r['pre_quant_scale_only_modelopt'])}: {r['pre_quant_scale_only_modelopt']}"
        )
    for k, v in r.get("dtype_shape_diff", {}).items():
        print(f"  dtype/shape {k}: {v}")
    for line in r.get("hf_quant_config_diff", []):
        print(f"  hf_quant_config {line}")
    for line in r.get("quantization_config_diff", []):
        print(f"  config.json {line}")
    for line in r.get("config_other_diff", []):
        print(f"  config.json (other) {line}")
    if r.get("plain_tensors_not_bit_equal"):
        print(f"  unquantized tensors not bit-equal: {r['plain_tensors_not_bit_equal']}")
    for lin, w in r.get("weights", {}).items():
        if "error" in w:
            print(f"  {lin}: {w['error']}")
            continue
        print(
            f"  {lin:36s} max {w['max_diff_steps']:6.3f} step  differ {w['frac_differ']:7.4%}  "
            f">1step {w['n_over_1_step']:5d}  relL2 {w['rel_l2']:.2e}  scale_rel {w['scale_max_rel_diff']:.2e}"
            f"  codes_eq {int(w['codes_equal'])} scale_eq {w['scale_equal_frac']:.3f} rtn {w['max_rtn_ratio']:.3f}"
        )
    bad = {k: v for k, v in r.get("scalars", {}).items() if v["rel"] > 0}
    if bad:
        worst = sorted(bad.items(), key=lambda kv: -kv[1]["rel"])
        print(f"  scalar scales differing: {len(bad)}/{len(r['scalars'])}; largest:")
        for k, v in worst[:6]:
            print(f"    {k}: lowbit {v['lowbit']:.6g} modelopt {v['modelopt']:.6g} rel {v['rel']:.2e}")


def table(results: dict[str, dict[str, Any]]) -> str:
    head = (
        f"{'config':14s} {'quant_algo':26s} {'struct':6s} {'pqs':>4s} {'json':>4s} {'max step':>8s} "
        f"{'differ':>8s} {'relL2':>8s} {'sc≠W':>5s} {'scal≠':>6s} verdict"
    )
    lines = [head, "-" * len(head)]
    for row, r in results.items():
        if "skipped" in r:
            lines.append(f"{row:14s} skipped: {r['skipped']}")
            continue
        algo = r.get("quant_algo", "?")
        nsc = sum(1 for v in r.get("scalars", {}).values() if v["rel"] > 1e-6)
        lines.append(
            f"{row:14s} {algo:26s} {'ok' if r.get('structure_ok') else 'DIFF':6s} "
            f"{len(r.get('pre_quant_scale_only_modelopt', [])):4d} "
            f"{len(r.get('hf_quant_config_diff', [])) + len(r.get('quantization_config_diff', [])):4d} "
            f"{r.get('max_diff_steps', math.nan):8.3f} {r.get('mean_frac_differ', math.nan):8.4%} "
            f"{r.get('max_rel_l2', math.nan):8.2e} {len(r.get('scale_differs', [])):5d} {nsc:6d} "
            f"{r.get('verdict', 'ERROR')}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", default="/tmp/modelopt-ref", help="modelopt_export_reference.py --out")
    ap.add_argument("--model", default=None, help="the tiny model (default <ref>/tiny-llama)")
    ap.add_argument("--work", default="/tmp/lowbit-vs-modelopt", help="lowbit checkpoints and exports")
    ap.add_argument("--rows", default=",".join(RUNS))
    ap.add_argument("--json", default=str(REPO / "benchmarks/results/hf-export-vs-modelopt.json"))
    a = ap.parse_args()
    ref, work = Path(a.ref), Path(a.work)
    model_dir = Path(a.model) if a.model else ref / "tiny-llama"
    results: dict[str, dict[str, Any]] = {}
    for row in a.rows.split(","):
        mo_dir = ref / RUNS[row][3]
        if not (mo_dir / "model.safetensors").exists() or (mo_dir / "error.txt").exists():
            results[row] = {"skipped": f"no ModelOpt export in {mo_dir}"}
            continue
        lb_dir, secs = run_lowbit(row, ref, work, model_dir)
        r = compare(row, lb_dir, mo_dir)
        r["quant_algo"] = json.loads((mo_dir / "hf_quant_config.json").read_text())["quantization"][
            "quant_algo"
        ]
        r["lowbit_seconds"] = round(secs, 2)
        results[row] = r
        print_row_details(row, r)
    print("\n" + table(results))
    print(
        "\nmax step: max over quantized Linears of max |lowbit - ModelOpt| dequantized, in steps of the coarser "
        "local grid; differ: mean fraction of differing elements; relL2: max ||diff|| / ||ModelOpt||; scal≠: "
        "scalar scales (input_scale, weight_scale_2, k/v_scale, per-tensor weight_scale) differing by > 1e-6 rel; "
        "pqs: ModelOpt pre_quant_scale tensors lowbit folds; json: hf_quant_config + quantization_config diffs"
    )
    out = Path(a.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"model": str(model_dir), "reference": str(ref), "notes": NOTES, "runs": results}, indent=1
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
