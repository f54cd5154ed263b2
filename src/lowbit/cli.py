"""Command line: parses, calls the library, prints. `lowbit --help` lists the commands."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lowbit import __version__
from lowbit.errors import LowbitError

log = logging.getLogger("lowbit")
DEFAULT_MODEL = Path(__file__).resolve().parent / "assets" / "stdlib-llama"
DEMO_PRESETS = ("fp8", "fp8_pc_pt", "int8_wo", "int8_sq", "w4a8_awq", "int4_awq", "nvfp4", "mxfp8", "mxfp4")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")


def build_parser() -> argparse.ArgumentParser:
    from lowbit.quant.steps import ALGORITHM_EXAMPLES, ALGORITHM_STEPS, param_flags

    parser = argparse.ArgumentParser(
        prog="lowbit", description="Post-training quantization of Hugging Face LLMs."
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model layer by layer into a resumable checkpoint")
    q.add_argument(
        "--model",
        "--hf-model-id",
        dest="model",
        default=None,
        help="model directory or hub id (default: the built-in stdlib-llama)",
    )
    q.add_argument(
        "--qformat", "--export-quant-cfg", dest="qformat", default="fp8", help="preset name (default fp8)"
    )
    q.add_argument("--recipe", default=None, help="YAML recipe file (replaces --qformat)")
    q.add_argument("--kv-cache", choices=("fp8", "nvfp4", "none"), default=None, help="KV cache format")
    q.add_argument(
        "--exclude", action="append", default=[], metavar="GLOB", help="leave matching modules unquantized"
    )
    q.add_argument(
        "--algorithm",
        default=None,
        help=f"calibration algorithm (default: the preset's): {', '.join(ALGORITHM_STEPS)}, or steps joined by "
        f"'+' ({', '.join(ALGORITHM_EXAMPLES)})",
    )
    for flag in param_flags():  # one per AlgorithmParams field; a bool's: --x / --no-x
        kind: dict[str, Any] = {"type": flag.type, "choices": flag.choices or None}
        if flag.type is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        q.add_argument(flag.option, dest=flag.name, default=None, help=flag.help, **kind)
    q.add_argument("--calib-data", default=None, help=".txt/.jsonl/.parquet file or cached dataset name")
    q.add_argument(
        "--calib-images", default=None,
        help='vision-language models: a .jsonl of {"image": PATH, "text": PROMPT} samples, added to the text',
    )  # fmt: skip
    q.add_argument("--calib-size", type=int, default=512)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--calib-batch-size", type=int, default=None, help="default: chosen from free memory")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument(
        "--output",
        "--megatron-save-path",
        dest="output",
        default=None,
        help="checkpoint directory (default ./<model>-<preset>)",
    )
    q.add_argument(
        "--resume", action="store_true", help="continue an interrupted run from its last finished layer"
    )
    q.add_argument(
        "--overwrite", action="store_true", help="replace an existing output once the new one is complete"
    )
    _common(q)

    g = sub.add_parser("generate", help="generate text with a quantized checkpoint or a plain model")
    g.add_argument(
        "--checkpoint", "--model", dest="checkpoint", default=None, help="checkpoint or model directory"
    )
    g.add_argument("--prompts", nargs="+", default=["def fibonacci(n):"])
    g.add_argument("--image", default=None, help="an image for every prompt (vision-language models)")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    _common(g)

    e = sub.add_parser("eval", help="perplexity, and KL / top-1 agreement against a base model")
    e.add_argument("--model", default=None, help="base model directory (with --checkpoint: the reference)")
    e.add_argument("--checkpoint", default=None, help="quantized checkpoint directory")
    e.add_argument("--data", default=None, help="evaluation text (default: the built-in held-out text)")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--max-samples", type=int, default=None)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--json", action="store_true", help="print one JSON object")
    _common(e)

    i = sub.add_parser("inspect", help="list quantized modules: formats, scales, weight SQNR")
    i.add_argument("checkpoint")
    i.add_argument("--json", action="store_true")
    _common(i)

    x = sub.add_parser(
        "export", help="write a quantized checkpoint (or a plain model) in a format an inference engine reads"
    )
    src = x.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", default=None, help="lowbit quantized checkpoint directory")
    src.add_argument("--model", default=None, help="plain Hugging Face model directory (no_quant export)")
    x.add_argument(
        "--format", required=True, choices=("hf", "compressed-tensors", "trtllm"),
        help="hf: ModelOpt's unified HF checkpoint (vLLM, SGLang, TensorRT-LLM); compressed-tensors "
        "(vLLM, transformers); trtllm: TensorRT-LLM checkpoint split for --inference-tp/--inference-pp",
    )  # fmt: skip
    x.add_argument("--output", "--export-dir", "--export_dir", dest="output", required=True)
    x.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                   help="dtype of the unquantized tensors (default: the model's)")  # fmt: skip
    x.add_argument("--decoder-type", "--decoder_type", dest="decoder_type", default=None,
                   help="TensorRT-LLM decoder type (default: detected from the architecture)")  # fmt: skip
    x.add_argument("--inference-tp", "--inference_tp", dest="tp", type=int, default=1)
    x.add_argument("--inference-pp", "--inference_pp", dest="pp", type=int, default=1)
    x.add_argument(
        "--overwrite", action="store_true", help="replace an existing output once the new one is complete"
    )
    _common(x)

    t = sub.add_parser(
        "qat", help="quantization-aware training (and distillation) of a quantized checkpoint; torchrun for DDP/FSDP"
    )
    t.add_argument("--config", default=None, help="YAML file with the sections train:, optimizer:, checkpoint:, ...")
    t.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="settings that win over the YAML, e.g. checkpoint.pretrained_checkpoint=DIR train.train_iters=200",
    )  # fmt: skip
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")

    d = sub.add_parser("demo", help="quantize the built-in model with several presets and compare them")
    d.add_argument("--presets", default=",".join(DEMO_PRESETS))
    d.add_argument("--calib-size", type=int, default=128)
    d.add_argument("--calib-seq-len", type=int, default=256)
    d.add_argument("--seq-len", type=int, default=256)
    d.add_argument("--max-samples", type=int, default=64)
    d.add_argument("--keep", default=None, metavar="DIR", help="keep the checkpoints in DIR")
    _common(d)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # Transparent huge pages for torch's CPU tensors of 2 MB and more (read by torch at its first allocation,
    # so only before torch is imported): lowbit returns every freed block of 1 MB or more to the OS
    # (models.loading.bound_heap), and with 4 kB pages touching them again costs a page fault per 4 kB
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    # idle OpenMP threads sleep instead of spinning: where the cores are busy (a shared machine, the other
    # process of a torchrun pair) a spinning thread waits for its sibling to be scheduled, and a 2-thread
    # op then costs 5x its CPU time (lowbit demo: 399 -> 57 s under load; docs/results.md)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "qat":  # key=value overrides may come before or after the options
        unknown = [a for a in extra if "=" not in a or a.startswith("-")]
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    worker = int(os.environ.get("RANK", "0")) > 0  # under torchrun only rank 0 reports
    logging.basicConfig(
        level=logging.WARNING if args.quiet or worker else logging.INFO, format="%(levelname)s %(message)s"
    )
    for noisy in ("transformers", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # lowbit shows its own progress
    from lowbit.models.loading import bound_heap

    bound_heap()  # this process's allocator: freed layer-sized blocks go back to the OS (models.loading)
    try:
        return int(COMMANDS[args.command](args) or 0)
    except LowbitError as e:
        print(f"lowbit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "lowbit: interrupted; quantize continues with --resume, qat from its latest save when rerun",
            file=sys.stderr,
        )
        return 130


# --- commands ---------------------------------------------------------------------------------------------


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet


def _tokenizer(path: Path) -> Any:
    from lowbit.models.loading import load_tokenizer

    return load_tokenizer(path)


def _recipe(args: argparse.Namespace) -> Any:
    from lowbit.quant.recipe import load_recipe, preset
    from lowbit.quant.steps import param_flags

    recipe = load_recipe(args.recipe) if args.recipe else preset(args.qformat)
    if args.algorithm:
        recipe = recipe.with_algorithm(args.algorithm)
    if args.kv_cache is not None:
        recipe = recipe.with_kv_cache(args.kv_cache)
    params = {f.name: getattr(args, f.name) for f in param_flags() if getattr(args, f.name, None) is not None}
    if params:
        recipe = recipe.with_params(**params)
    return recipe.with_exclude(args.exclude) if args.exclude else recipe


def cmd_quantize(args: argparse.Namespace) -> int:
    from lowbit.algorithms.layerwise import quantize_checkpoint
    from lowbit.data.text import DEFAULT_CALIB, calibration_windows
    from lowbit.models.loading import check_context, env_device, load_config, resolve_model

    recipe = _recipe(args)
    model_dir = resolve_model(args.model) if args.model else DEFAULT_MODEL
    config = load_config(model_dir)
    check_context(config, args.calib_seq_len)  # before the windows are built: with long ones, that is slow
    device = env_device(args.device)
    output = Path(args.output or f"{model_dir.name}-{recipe.name}")
    calib = calibration_windows(
        args.calib_data or DEFAULT_CALIB,
        _tokenizer(model_dir),
        args.calib_size,
        args.calib_seq_len,
        args.seed,
    )
    log.info("calibrating on %d samples of %d tokens", *calib.shape)
    images = None
    if args.calib_images:
        from lowbit.models.vision import image_samples

        images = image_samples(args.calib_images, model_dir, config, _tokenizer(model_dir), args.calib_size)
        log.info("and %d image + text samples", len(images))
    result = quantize_checkpoint(
        model_dir,
        recipe,
        output,
        calib,
        device=device,
        batch_size=args.calib_batch_size,
        resume=args.resume,
        overwrite=args.overwrite,
        progress=_progress(args),
        images=images,
    )
    print(
        f"quantized {len(result.modules)} modules of {model_dir} with {recipe.name}, algorithm {result.algorithm}, "
        f"in {result.seconds:.1f}s -> {result.output}"
    )
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from lowbit.export import ExportOptions, export
    from lowbit.export.source import Source

    source = Source(args.checkpoint or args.model or DEFAULT_MODEL)
    if args.checkpoint and source.manifest is None:
        raise LowbitError(
            f"{args.checkpoint} is not a lowbit quantized checkpoint (no lowbit.json); "
            "pass it with --model to export it unquantized, or quantize it first"
        )
    options = ExportOptions(
        dtype=getattr(torch, args.dtype) if args.dtype else None, decoder_type=args.decoder_type, tp=args.tp,
        pp=args.pp, overwrite=args.overwrite, progress=_progress(args),
    )  # fmt: skip
    start = time.perf_counter()
    out = export(source, args.format, args.output, options)
    print(
        f"exported {source.dir} ({source.preset}) as {args.format} in {time.perf_counter() - start:.1f}s -> {out}"
    )
    return 0


def cmd_qat(args: argparse.Namespace) -> int:
    from lowbit.train.config import load_config
    from lowbit.train.trainer import run

    cfg = load_config(args.config, args.overrides)
    result = run(cfg, progress=_progress(args))
    if int(os.environ.get("RANK", "0")) == 0:
        loss = f"loss {result.final_loss:.4f}" if result.final_loss is not None else "no steps run"
        evl = f", eval loss {result.eval_loss:.4f}" if result.eval_loss is not None else ""
        where = f" -> {result.save_dir}/latest" if result.save_dir else ""
        print(f"qat: iteration {result.iteration}, {loss}{evl} in {result.seconds:.1f}s{where}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from lowbit.loader import load_model
    from lowbit.models.loading import env_device, resolve_model

    path = resolve_model(args.checkpoint) if args.checkpoint else DEFAULT_MODEL
    device = env_device(args.device)
    image = None
    if args.image is not None:  # checked before the model is loaded
        from lowbit.models.loading import load_config
        from lowbit.models.vision import load_image, require_vision_language

        require_vision_language(load_config(path), "--image")
        image = load_image(args.image)
    model, manifest = load_model(path, device)
    tok = _tokenizer(path)
    what = f"{manifest['recipe']['name']} checkpoint" if manifest else "unquantized model"
    print(f"# {path} ({what})")
    for prompt in args.prompts:
        if image is not None:
            from lowbit.models.vision import image_prompt

            inputs = image_prompt(path, model.config, tok, prompt, image)
        else:
            inputs = {"input_ids": tok(prompt, return_tensors="pt").input_ids}
        inputs = {k: v.to(device) for k, v in inputs.items()}
        ids = inputs["input_ids"]
        sampling = (
            {"do_sample": True, "temperature": args.temperature}
            if args.temperature > 0
            else {"do_sample": False}
        )
        with torch.no_grad():
            out = model.generate(  # type: ignore[operator]
                **inputs,
                max_new_tokens=args.max_new_tokens,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
                **sampling,
            )
        print(f"{prompt}{tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)}")
        print("---")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lowbit.data.text import DEFAULT_EVAL, eval_windows
    from lowbit.eval.runner import evaluate
    from lowbit.loader import load_model
    from lowbit.models.loading import check_context, env_device, load_config, resolve_model

    device = env_device(args.device)
    if not args.model and not args.checkpoint:
        args.model = str(DEFAULT_MODEL)
    target = resolve_model(args.checkpoint or args.model)
    check_context(load_config(target), args.seq_len, "--seq-len")  # before any model is loaded
    model, _ = load_model(target, device)
    base = load_model(resolve_model(args.model), device)[0] if args.checkpoint and args.model else None
    windows = eval_windows(args.data or DEFAULT_EVAL, _tokenizer(target), args.seq_len, args.max_samples)
    result = evaluate(model, windows, base, args.batch_size, device, _progress(args))
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if value is not None:
                print(f"{key:>11}: {value:.6g}" if isinstance(value, float) else f"{key:>11}: {value}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from lowbit.eval.inspect import kv_quantizers, report
    from lowbit.loader import load_model
    from lowbit.models.loading import resolve_model

    path = resolve_model(args.checkpoint)
    model, manifest = load_model(path, "cpu")
    if manifest is None:
        raise LowbitError(
            f"{path} is not a lowbit quantized checkpoint (no lowbit.json); pass a `lowbit quantize` output"
        )
    rows = report(model)
    kv = kv_quantizers(model)
    if args.json:
        print(
            json.dumps(
                {
                    "manifest": manifest,
                    "modules": [r.__dict__ for r in rows],
                    "kv_cache": [{"name": n, "format": f, "amax": a} for n, f, a in kv],
                }
            )
        )
        return 0
    print(
        f"# {path}: preset {manifest['recipe']['name']}, algorithm {manifest['algorithm']}"
        f" (requested {manifest['algorithm_requested']}), lowbit {manifest['lowbit_version']}"
    )
    errors = manifest.get("errors", {})
    table = [
        (
            r.name,
            r.weight,
            r.input,
            f"{r.scale_min:.3g}..{r.scale_max:.3g}",
            f"{r.sqnr_db:.2f}",
            f"{8 * r.packed_bytes / r.numel:.3f}",
            *_error_columns(errors.get(r.name, {})),
        )
        for r in rows
    ]
    print_table(
        ("module", "weight", "input", "weight scales", "SQNR dB", "bits/w", "out err RTN dB", "out err dB"),
        table,
    )
    print(
        "out err: the module's output error on the calibration inputs, 10 log10(|X (W_q - W)^T|^2 / |X W^T|^2), "
        "for round-to-nearest with max scales and after the algorithm (weight error where no data was used)"
    )
    for name, fmt, amax in kv:
        print(f"{name}: {fmt}, amax {amax:.4g}")
    routed = _routed_tokens(errors)
    if routed:
        print("calibration tokens the router sent to each expert (every expert is calibrated on every token):")
        for block, counts in routed.items():
            idle = [str(e) for e, c in enumerate(counts) if c == 0]
            note = f"  <- expert {', '.join(idle)} got none" if idle else ""
            print(f"{block}: {' '.join(str(c) for c in counts)}{note}")
    return 0


def _routed_tokens(errors: dict[str, Any]) -> dict[str, list[int]]:
    """{experts module: [tokens routed to each expert]} from the error report of a MoE checkpoint."""
    out: dict[str, dict[int, int]] = {}
    for name, e in errors.items():
        if "routed_tokens" not in e:
            continue
        block, index, _ = name.rsplit(".", 2)
        out.setdefault(block, {})[int(index)] = int(e["routed_tokens"])
    return {b: [c[i] for i in sorted(c)] for b, c in out.items()}


def _error_columns(e: dict[str, Any]) -> tuple[str, str]:
    before, after = e.get("before", e.get("weight_before")), e.get("after", e.get("weight_after"))
    return _db(before), _db(after)


def _db(x: float | None) -> str:
    import math

    return "-" if x is None else "-inf" if x <= 0 else f"{10 * math.log10(x):.2f}"


def cmd_demo(args: argparse.Namespace) -> int:
    from lowbit.algorithms.layerwise import quantize_checkpoint
    from lowbit.data.text import DEFAULT_CALIB, DEFAULT_EVAL, calibration_windows, eval_windows
    from lowbit.eval.inspect import model_size_bytes
    from lowbit.eval.runner import base_outputs, evaluate
    from lowbit.loader import load_model
    from lowbit.models.loading import env_device
    from lowbit.quant.recipe import preset

    device = env_device(args.device)
    tok = _tokenizer(DEFAULT_MODEL)
    calib = calibration_windows(DEFAULT_CALIB, tok, args.calib_size, args.calib_seq_len)
    windows = eval_windows(DEFAULT_EVAL, tok, args.seq_len, args.max_samples)
    base, _ = load_model(DEFAULT_MODEL, device)
    reference = base_outputs(base, windows, device=device, progress=False)  # the base model runs once
    base_ppl = reference.ppl
    rows = [("bf16 (base)", "16", f"{_mb(model_size_bytes(base)[0])}", f"{base_ppl:.3f}", "-", "-", "-")]
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="lowbit-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.presets.split(","):
            recipe = preset(name.strip())
            start = time.perf_counter()
            out = quantize_checkpoint(
                DEFAULT_MODEL,
                recipe,
                workdir / recipe.name,
                calib,
                device=device,
                overwrite=True,
                progress=False,
            )
            seconds = time.perf_counter() - start
            model, _ = load_model(out.output, device)
            r = evaluate(model, windows, reference, device=device, progress=False)
            size, qnumel, qbytes = model_size_bytes(model)
            bits = 8 * qbytes / max(qnumel, 1)
            rows.append(
                (
                    recipe.name,
                    f"{bits:.2f}",
                    _mb(size),
                    f"{r['ppl']:.3f}",
                    f"{r['kl']:.5f}",
                    f"{r['top1_agree']:.3f}",
                    f"{seconds:.1f}",
                )
            )
            if _progress(args):
                print(f"  {recipe.name}: done", file=sys.stderr)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print(
        f"# built-in stdlib-llama, calibration {args.calib_size}x{args.calib_seq_len}, "
        f"eval {len(windows)}x{args.seq_len} tokens; bits/weight of quantized Linears incl. scales"
    )
    print_table(("preset", "bits/w", "size MB", "ppl", "KL", "top-1", "time s"), rows)
    return 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip())


COMMANDS = {
    "quantize": cmd_quantize,
    "generate": cmd_generate,
    "eval": cmd_eval,
    "inspect": cmd_inspect,
    "export": cmd_export,
    "qat": cmd_qat,
    "demo": cmd_demo,
}

if __name__ == "__main__":
    sys.exit(main())
