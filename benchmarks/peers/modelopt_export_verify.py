"""Re-derive ModelOpt 0.47.0's unified HF export bit for bit from the calibrated state, in plain torch.

Reads <out>/<config>/calib_state.pt (written by modelopt_export_reference.py: the model state_dict right after
mtq.quantize, i.e. the float (BF16) weights the exporter starts from, plus each TensorQuantizer's amax /
pre_quant_scale) and <out>/<config>/model.safetensors (ModelOpt's export), recomputes every exported tensor with the
formulas documented in the report (no ModelOpt import), and prints, per config, which tensors match bit-exactly.
This checks that the export maths in the report is complete, including ModelOpt's export-time re-smoothing of
fused q/k/v and gate/up groups and the AWQ layernorm folding. Llama-style module names only.

    ~/.cache/lowbit-peers/modelopt/bin/python benchmarks/peers/modelopt_export_verify.py --out /tmp/modelopt-ref
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

E4M3_MAX = 448.0
E2M1_MAX = 6.0
_E2M1_BOUNDS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])

# config dir -> ModelOpt's per-layer quantization format
FORMATS = {
    "fp8": "fp8", "fp8_kv": "fp8", "fp8_pc_pt": "fp8_pc_pt", "int8_sq": "int8_sq", "int8_sq_kv": "int8_sq",
    "int8_wo": "int8_wo", "int4_awq": "int4_awq", "int4_awq_kv": "int4_awq", "w4a8_awq": "w4a8_awq",
    "w4a8_awq_kv": "w4a8_awq", "nvfp4": "nvfp4", "nvfp4_kv": "nvfp4", "nvfp4_awq": "nvfp4_awq",
    "nvfp4_wo": "w4a16_nvfp4", "mxfp8": "mxfp8",
}
NVFP4_FORMATS = ("nvfp4", "nvfp4_awq", "w4a16_nvfp4")


def cast_fp4(x: torch.Tensor) -> torch.Tensor:
    """E2M1 code (sign << 3 | magnitude index), round half to even, saturating at 6; x < 0 sets the sign bit even
    when the magnitude rounds to 0 (code 8 = -0)."""
    sign = (x < 0).to(torch.uint8)
    a = x.abs()
    idx = torch.searchsorted(_E2M1_BOUNDS, a, out_int32=True).to(torch.uint8)
    tie_up = ((a == 0.75) | (a == 1.75) | (a == 3.5)).to(torch.uint8)
    return (sign << 3) + idx + tie_up


class Layer:
    """One Linear: weight (bf16) and its quantizer state, mutated the way the exporter mutates it."""

    def __init__(self, name, sd, q):
        self.name = name
        self.w = sd[name + ".weight"].clone()
        self.wq = q.get(name + ".weight_quantizer")
        self.wq0 = q.get(name + ".weight_quantizer.0")
        self.wq1 = q.get(name + ".weight_quantizer.1")
        self.iq = q.get(name + ".input_quantizer", {})
        self.pqs = self.iq.get("pre_quant_scale")
        self.in_amax = self.iq.get("amax") if self.iq.get("enabled") else None
        wq = self.wq0 if self.wq0 is not None else self.wq
        self.w_amax = wq.get("amax") if wq else None
        self.w2_amax = self.wq1.get("amax") if self.wq1 else None
        self.block = (wq.get("block_sizes") or {}).get(-1) if wq else None

    def recalibrate(self, fmt):
        """weight_quantizer.reset_amax() + max calibration on the current weight."""
        w = self.w
        if fmt in ("int4_awq", "w4a8_awq"):
            self.w_amax = w.float().reshape(-1, self.block).abs().amax(-1, keepdim=True)  # (out*in/bs, 1) fp32
            if fmt == "w4a8_awq":
                self.w2_amax = w.abs().amax()  # second (FP8) quantizer calibrates on the raw weight, bf16
        elif fmt in ("int8_sq", "int8_wo"):
            self.w_amax = w.abs().amax(-1, keepdim=True)  # (out, 1), bf16
        else:
            self.w_amax = w.abs().amax()  # per-tensor, bf16


def resmooth(layers, fmt):
    """preprocess_linear_fusion (quant_utils.py:1490) for modules sharing one input."""
    if layers[0].pqs is not None:
        avg = torch.mean(torch.stack([m.pqs for m in layers]), dim=0)
        for m in layers:
            if not torch.equal(m.pqs, avg):  # _update_pre_quant_scale (quant_utils.py:1300)
                m.w = (m.w.float() * m.pqs.float() / avg.float()).to(m.w.dtype)
                m.pqs = avg.clone()
                m.recalibrate(fmt)
    if layers[0].in_amax is not None:
        a = torch.max(torch.stack([m.in_amax for m in layers]))
        for m in layers:
            m.in_amax = a.clone()
    if fmt == "w4a8_awq":
        a = torch.max(torch.stack([m.w2_amax for m in layers]))
        for m in layers:
            m.w2_amax = a.clone()
    elif layers[0].w_amax is not None and layers[0].w_amax.numel() == 1:
        a = torch.max(torch.stack([m.w_amax for m in layers]))
        for m in layers:
            m.w_amax = a.clone()


def export_layer(m: Layer, fmt: str) -> dict[str, torch.Tensor]:
    out, w = {}, m.w  # w: bf16 (export dtype)
    n = m.name
    if fmt == "fp8":
        ws = torch.tensor(m.w_amax.float().item() / E4M3_MAX)
        out[n + ".weight"] = (w / ws).to(torch.float8_e4m3fn)  # bf16 / 0-d fp32 -> bf16, then fp8
        out[n + ".weight_scale"] = ws
        out[n + ".input_scale"] = (m.in_amax.float() / E4M3_MAX).squeeze()
    elif fmt == "fp8_pc_pt":
        ws = m.w_amax.float().squeeze() / E4M3_MAX
        out[n + ".weight"] = (w / ws[:, None]).to(torch.float8_e4m3fn)
        out[n + ".weight_scale"] = ws
    elif fmt in ("int8_sq", "int8_wo"):
        ws = m.w_amax.float().squeeze() / 127.0
        out[n + ".weight"] = (w / ws[:, None]).round().clamp(-128, 127).to(torch.int8)
        out[n + ".weight_scale"] = ws
        if fmt == "int8_sq":
            out[n + ".input_scale"] = (m.in_amax.float() / 127.0).squeeze()
    elif fmt in ("int4_awq", "w4a8_awq"):
        o, i = w.shape
        ws = (m.w_amax.float() / 7.0).reshape(o, i // m.block)
        q = (w / ws[:, torch.arange(i) // m.block]).round().clamp(-8, 7).to(torch.int8)
        q = q.T.reshape(i, o // 2, 2)
        out[n + ".weight"] = ((q[..., 0] & 0x0F) | ((q[..., 1] & 0x0F) << 4)).T.contiguous().view(torch.uint8)
        out[n + ".weight_scale"] = ws
        if fmt == "w4a8_awq":
            out[n + ".weight_scale_2"] = (m.w2_amax.float() / E4M3_MAX).squeeze()
            out[n + ".input_scale"] = (m.in_amax.float() / E4M3_MAX).squeeze()
    elif fmt in NVFP4_FORMATS:
        bs = m.block
        ws2 = m.w_amax.float() / (E2M1_MAX * E4M3_MAX)
        bamax = w.reshape(*w.shape[:-1], -1, bs).abs().amax(-1).float()
        s = bamax / (E2M1_MAX * ws2)
        s[s == 0] = 1.0
        ws = s.clamp(min=2**-9, max=E4M3_MAX).to(torch.float8_e4m3fn)
        scaled = (w.view(*w.shape[:-1], -1, bs) / (ws.float() * ws2).unsqueeze(-1)).view(w.shape)
        c = cast_fp4(scaled)
        out[n + ".weight"] = (c[..., 1::2] << 4) | c[..., 0::2]
        out[n + ".weight_scale"] = ws
        out[n + ".weight_scale_2"] = ws2.squeeze()
        if fmt != "w4a16_nvfp4":
            out[n + ".input_scale"] = (m.in_amax.float() / (E2M1_MAX * E4M3_MAX)).squeeze()
    elif fmt == "mxfp8":
        bamax = w.reshape(*w.shape[:-1], -1, 32).abs().amax(-1).float()
        d = bamax / E4M3_MAX
        e = torch.ceil(torch.where(d > 0, torch.log2(d), torch.tensor(-127.0))).clamp(-127, 127)
        sc = (e + 127).to(torch.uint8)
        wq = (w.view(*w.shape[:-1], -1, 32) * torch.exp2(127 - sc.float()).unsqueeze(-1)).clamp(-448, 448)
        out[n + ".weight"] = wq.to(torch.float8_e4m3fn).view(w.shape)
        out[n + ".weight_scale"] = sc
    if m.pqs is not None:
        out[n + ".pre_quant_scale"] = m.pqs
    return out


def recompute(state: dict, fmt: str) -> dict[str, torch.Tensor]:
    sd, q = state["state_dict"], state["quantizers"]
    n_layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("model.layers."))
    exp: dict[str, torch.Tensor] = {}
    for li in range(n_layers):
        p = f"model.layers.{li}."
        L = {s: Layer(p + s, sd, q) for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
        ln = {"input_layernorm": sd[p + "input_layernorm.weight"].clone(),
              "post_attention_layernorm": sd[p + "post_attention_layernorm.weight"].clone()}
        if fmt == "nvfp4_awq":
            # fuse_prequant_to_linear (quant_utils.py:1369): down_proj pqs -> up_proj rows (LlamaMLP); o_proj pqs ->
            # v_proj rows only if sizes match (not with GQA: skipped with a warning)
            for into, frm in (("self_attn.v_proj", "self_attn.o_proj"), ("mlp.up_proj", "mlp.down_proj")):
                a, b = L[into], L[frm]
                if b.pqs is not None and b.pqs.numel() == a.w.shape[-2]:
                    a.w = a.w * b.pqs.view(-1, 1)
                    a.recalibrate(fmt)
                    b.pqs = None
        if fmt not in ("fp8",):  # FP8 (and FP8_PB_REAL) groups are not fused (unified_export_hf.py:382)
            for group, norm in ((("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
                                (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm")):
                g = [L[s] for s in group]
                resmooth(g, fmt)
                if "awq" in fmt and g[0].pqs is not None:  # fuse_prequant_layernorm (quant_utils.py:1457)
                    ln[norm] = (ln[norm] * g[0].pqs).to(ln[norm].dtype)
                    for m in g:
                        m.pqs = None
        for m in L.values():
            exp.update(export_layer(m, fmt))
        for k, v in ln.items():
            exp[p + k + ".weight"] = v
        for kv in ("k", "v"):
            kq = q.get(p + f"self_attn.{kv}_bmm_quantizer")
            if kq is not None and kq.get("enabled") and kq.get("amax") is not None:
                exp[p + f"self_attn.{kv}_proj.{kv}_scale"] = (kq["amax"].float() / E4M3_MAX).squeeze()
    for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        exp[k] = sd[k]
    return exp


def compare(exp: dict, got: dict) -> dict:
    res = {"missing_in_export": sorted(set(exp) - set(got)), "unexpected_in_export": sorted(set(got) - set(exp)),
           "exact": 0, "mismatch": {}}
    for k in sorted(set(exp) & set(got)):
        e, g = exp[k], got[k]
        if e.dtype != g.dtype or tuple(e.shape) != tuple(g.shape):
            res["mismatch"][k] = f"dtype/shape {e.dtype}{tuple(e.shape)} vs {g.dtype}{tuple(g.shape)}"
            continue
        eb = e.contiguous().view(torch.uint8) if e.element_size() == 1 else e.contiguous().view(
            {2: torch.int16, 4: torch.int32}[e.element_size()])
        gb = g.contiguous().view(torch.uint8) if g.element_size() == 1 else g.contiguous().view(
            {2: torch.int16, 4: torch.int32}[g.element_size()])
        if torch.equal(eb, gb):
            res["exact"] += 1
        else:
            nbad = int((eb != gb).sum())
            res["mismatch"][k] = f"{nbad}/{e.numel()} elements differ"
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/modelopt-ref")
    ap.add_argument("--configs", default=",".join(FORMATS))
    a = ap.parse_args()
    report = {}
    for c in a.configs.split(","):
        d = Path(a.out) / c
        if not (d / "model.safetensors").exists():
            report[c] = "no export"
            continue
        state = torch.load(d / "calib_state.pt", weights_only=False)
        got = {}
        for f in sorted(d.glob("*.safetensors")):
            got.update(load_file(str(f)))
        r = compare(recompute(state, FORMATS[c]), got)
        report[c] = r
        print(f"{c:12s} exact {r['exact']:3d}/{len(got)}  mismatch {len(r['mismatch'])}  "
              f"missing {len(r['missing_in_export'])}  unexpected {len(r['unexpected_in_export'])}", flush=True)
        for k, v in list(r["mismatch"].items())[:6]:
            print(f"    {k}: {v}")
        for k in r["missing_in_export"][:4] + r["unexpected_in_export"][:4]:
            print(f"    set-diff: {k}")
    (Path(a.out) / "verify.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
