"""Reference exports of NVIDIA ModelOpt 0.47.0's unified Hugging Face exporter (export_hf_checkpoint), CPU only.

Runs in the modelopt peer venv (see setup.sh):

    OMP_NUM_THREADS=1 ~/.cache/lowbit-peers/modelopt/bin/python benchmarks/peers/modelopt_export_reference.py \
        --out /tmp/modelopt-ref [--model /tmp/modelopt-ref/tiny-llama] [--configs fp8,int4_awq,...]

For each config: load a tiny BF16 Llama (built from a LlamaConfig with torch.manual_seed(0) and saved with
save_pretrained when --model does not exist yet), mtq.quantize() it with a forward loop over a few random-token
batches (fixed seed), save the calibrated state (calib_state.pt: the model state_dict right after calibration, i.e.
the float weights as the exporter sees them, plus every TensorQuantizer's attributes and amax / pre_quant_scale /
global_amax buffers), then export_hf_checkpoint(model, export_dir=<out>/<config>) and write <out>/<config>/summary.json
(file list, hf_quant_config.json, config.json's quantization_config, every safetensors tensor's name/dtype/shape and
the value of scalars). Each config runs in its own subprocess (one at a time) so a failure does not leak state; a
failed config writes <out>/<config>/error.txt (and summary.json with "error").

CPU work-around: ModelOpt's dynamic block fake-quant (NVFP4 with E4M3 scales, MX formats with E8M0 scales) needs a
CUDA tensor / CUDA extension ("amax must be a CUDA tensor for dynamic block quantization"). With --cpu-block-patch
(default on) tensor_quant.dynamic_block_quantize_op is replaced by a pure-torch implementation of the same maths
(NVFP4: global scale = amax / (6 * 448), per-16 block scale = fp8_e4m3(block_amax / 6 / global_scale) * global_scale,
values rounded to E2M1; MXFP8: per-32 block scale 2^ceil(log2(block_amax / 448)), values cast to E4M3). This only
changes the fake-quant forward used during calibration (i.e. activations seen by later layers); the export path
itself (NVFP4QTensor / MXFP8QTensor) is pure torch and untouched. Observed: max calibration never runs the fake
quant (quantizers only collect amax, and the exporter's own probe forward disables all quantizers), so NVFP4 /
W4A16 NVFP4 / MXFP8 with "max" export bit-identically with or without the patch; it is needed only when calibration
itself fake-quantizes, e.g. NVFP4_AWQ_LITE_CFG (the AWQ search), which otherwise fails with that AssertionError.
The companion modelopt_export_verify.py re-derives every exported tensor bit-exactly from calib_state.pt.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)

# name -> (ModelOpt config attribute, kv cache config attribute or None)
CONFIGS: dict[str, tuple[str, str | None]] = {
    "fp8": ("FP8_DEFAULT_CFG", None),
    "fp8_kv": ("FP8_DEFAULT_CFG", "FP8_KV_CFG"),
    "fp8_pc_pt": ("FP8_PER_CHANNEL_PER_TOKEN_CFG", None),
    "int8_sq": ("INT8_SMOOTHQUANT_CFG", None),
    "int8_sq_kv": ("INT8_SMOOTHQUANT_CFG", "FP8_KV_CFG"),
    "int8_wo": ("INT8_WEIGHT_ONLY_CFG", None),
    "int4_awq": ("INT4_AWQ_CFG", None),
    "int4_awq_kv": ("INT4_AWQ_CFG", "FP8_KV_CFG"),
    "w4a8_awq": ("W4A8_AWQ_BETA_CFG", None),
    "w4a8_awq_kv": ("W4A8_AWQ_BETA_CFG", "FP8_KV_CFG"),
    "nvfp4": ("NVFP4_DEFAULT_CFG", None),
    "nvfp4_kv": ("NVFP4_DEFAULT_CFG", "FP8_KV_CFG"),
    "nvfp4_awq": ("NVFP4_AWQ_LITE_CFG", None),
    "nvfp4_wo": ("W4A16_NVFP4_CFG", None),
    "mxfp8": ("MXFP8_DEFAULT_CFG", None),
    "fp8_pb_wo": ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", None),
    # the AWQ configs with plain max calibration (no smoothing, no clip search): the references that
    # compare_hf_export.py checks lowbit's `--algorithm max` int4 / w4a8 exports against value for value
    "int4_max": ("INT4_AWQ_CFG", None),
    "w4a8_max": ("W4A8_AWQ_BETA_CFG", None),
}
# config -> calibration algorithm replacing the ModelOpt config's own
ALGORITHM_OVERRIDE: dict[str, str] = {"int4_max": "max", "w4a8_max": "max"}

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def build_model(path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(**TINY, torch_dtype="bfloat16")
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    print(f"built tiny llama at {path}", flush=True)


def calib_batches(vocab: int, n: int = 4, batch: int = 2, seq: int = 64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(n)]


# ---------------------------------------------------------------- CPU patch for dynamic block fake quant
_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _round_e2m1(x: torch.Tensor) -> torch.Tensor:
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    codes = NVFP4QTensor._cast_fp4(x.clone()).long()  # sign << 3 | ordinal (same rounding as the exporter)
    mag = _E2M1.to(x.device)[codes & 7]
    return torch.where(codes >= 8, -mag, mag)


def _cpu_dynamic_block_quantize(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                                scale_exponent_bits):
    scale_bits = (scale_exponent_bits, scale_num_bits - scale_exponent_bits - 1)
    nb = (exponent_bits, num_bits - exponent_bits - 1) if exponent_bits != 0 else num_bits
    dtype, shape = inputs.dtype, inputs.shape
    x = inputs.float()
    last = shape[-1]
    pad = (-last) % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    xb = x.reshape(-1, block_size)
    bamax = xb.abs().amax(-1, keepdim=True)
    if nb == (2, 1) and scale_bits == (4, 3):
        gamax = amax.float().amax() if amax is not None else xb.abs().amax()
        gscale = gamax / (6.0 * 448.0)
        if float(gscale) == 0.0:
            return inputs.clone()
        s = (bamax / 6.0 / gscale).clamp(max=448.0).to(torch.float8_e4m3fn).float() * gscale
        s = torch.where(s == 0, torch.ones_like(s), s)
        q = _round_e2m1(xb / s) * s
    elif scale_bits == (8, 0) and nb == (4, 3):
        e = torch.where(bamax > 0, torch.log2(bamax / 448.0), torch.full_like(bamax, -127.0))
        s = torch.exp2(torch.ceil(e).clamp(-127, 127))
        q = (xb / s).clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float() * s
    else:
        raise NotImplementedError(f"cpu patch: num_bits {nb} scale_bits {scale_bits}")
    q = q.reshape(*shape[:-1], last + pad)[..., :last]
    return q.to(dtype)


def patch_cpu_block_quant() -> None:
    import modelopt.torch.quantization.tensor_quant as tq

    tq.dynamic_block_quantize_op = _cpu_dynamic_block_quantize


# ---------------------------------------------------------------- state capture
def _t(v):
    return v.detach().clone().cpu() if isinstance(v, torch.Tensor) else v


def quantizer_state(model) -> dict:
    from modelopt.torch.quantization.nn import TensorQuantizer

    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, TensorQuantizer):
            continue
        d = {"class": type(mod).__name__, "enabled": bool(mod.is_enabled)}
        for attr in ("num_bits", "axis", "block_sizes", "unsigned", "narrow_range", "fake_quant"):
            with contextlib.suppress(Exception):
                v = getattr(mod, attr)
                d[attr] = copy.deepcopy(v) if not isinstance(v, torch.Tensor) else _t(v)
        for buf in ("_amax", "_pre_quant_scale", "_global_amax", "_scale", "_bias_value"):
            v = getattr(mod, buf, None)
            if isinstance(v, torch.Tensor):
                d[buf.lstrip("_")] = _t(v)
        with contextlib.suppress(Exception):
            d["maxbound"] = float(mod.maxbound)
        out[name] = d
    return out


# ---------------------------------------------------------------- summary
def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


def summarize(export_dir: Path) -> dict:
    from safetensors import safe_open

    files = sorted(str(p.relative_to(export_dir)) for p in export_dir.rglob("*") if p.is_file()
                   and p.name != "summary.json")
    s: dict = {"export_dir": str(export_dir), "files": files}
    hq = export_dir / "hf_quant_config.json"
    s["hf_quant_config"] = json.loads(hq.read_text()) if hq.exists() else None
    cj = export_dir / "config.json"
    s["config_quantization_config"] = json.loads(cj.read_text()).get("quantization_config") if cj.exists() else None
    tensors = {}
    for f in sorted(export_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sorted(sf.keys()):
                t = sf.get_tensor(k)
                e = {"file": f.name, "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape)}
                if t.numel() == 1:
                    e["value"] = t.float().item() if t.dtype != torch.uint8 else int(t.item())
                tensors[k] = e
    s["tensors"] = tensors
    return s


# ---------------------------------------------------------------- one config
def run_one(name: str, model_dir: Path, out: Path, cpu_patch: bool) -> None:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoModelForCausalLM

    if cpu_patch:
        patch_cpu_block_quant()
    cfg_name, kv_name = CONFIGS[name]
    export_dir = out / name
    export_dir.mkdir(parents=True, exist_ok=True)
    for p in export_dir.iterdir():
        if p.is_file():
            p.unlink()
    log: dict = {"config": cfg_name, "kv_cfg": kv_name, "cpu_block_patch": cpu_patch}
    try:
        if not hasattr(mtq, cfg_name):
            raise AttributeError(f"modelopt.torch.quantization has no {cfg_name}")
        cfg = copy.deepcopy(getattr(mtq, cfg_name))
        if kv_name:
            # as examples/llm_ptq/hf_ptq.py: append the kv config entries (*[kv]_bmm_quantizer) to quant_cfg
            from modelopt.torch.quantization.utils.core_utils import update_quant_cfg_with_kv_cache_quant

            cfg = update_quant_cfg_with_kv_cache_quant(cfg, getattr(mtq, kv_name)["quant_cfg"])
        if name in ALGORITHM_OVERRIDE:
            cfg["algorithm"] = ALGORITHM_OVERRIDE[name]
        log["algorithm"] = _jsonable(cfg.get("algorithm"))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
        model.eval()
        batches = calib_batches(model.config.vocab_size)

        @torch.no_grad()
        def loop(m):
            for b in batches:
                m(input_ids=b, use_cache=False)

        torch.manual_seed(0)
        mtq.quantize(model, cfg, loop)
        torch.save({"state_dict": {k: _t(v) for k, v in model.state_dict().items()},
                    "quantizers": quantizer_state(model), "calib_input_ids": batches, "config": _jsonable(cfg)},
                   export_dir / "calib_state.pt")
        with torch.inference_mode():
            export_hf_checkpoint(model, export_dir=str(export_dir))
        # keep calib_state.pt next to the export but out of the file list comparison
        s = summarize(export_dir)
        s.update(log)
    except Exception as e:
        tb = traceback.format_exc()
        (export_dir / "error.txt").write_text(tb)
        s = summarize(export_dir)
        s.update(log)
        s["error"] = f"{type(e).__name__}: {e}"
    (export_dir / "summary.json").write_text(json.dumps(s, indent=1))
    print(json.dumps(s, indent=1), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/modelopt-ref/tiny-llama")
    ap.add_argument("--out", default="/tmp/modelopt-ref")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-cpu-block-patch", action="store_true")
    ap.add_argument("--no-isolate", action="store_true")
    a = ap.parse_args()
    model_dir, out = Path(a.model), Path(a.out)
    if a.one:
        run_one(a.one, model_dir, out, not a.no_cpu_block_patch)
        return
    if not (model_dir / "config.json").exists():
        build_model(model_dir)
    for name in a.configs.split(","):
        print(f"=== {name}", flush=True)
        if a.no_isolate:
            run_one(name, model_dir, out, not a.no_cpu_block_patch)
            continue
        cmd = [sys.executable, __file__, "--model", str(model_dir), "--out", str(out), "--one", name]
        if a.no_cpu_block_patch:
            cmd.append("--no-cpu-block-patch")
        subprocess.run(cmd, check=False)


if __name__ == "__main__":
    main()
