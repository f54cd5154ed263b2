"""The README's Python example, as written there."""

import torch


def test_readme_python_example(tiny_llama, calib_ids):
    from transformers import AutoModelForCausalLM

    import lowbit

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    with torch.no_grad():
        before = model(calib_ids[:2]).logits
        specs = lowbit.quantize(
            model, lowbit.preset("nvfp4").with_kv_cache("fp8"), forward_loop=lambda m: m(calib_ids)
        )
        after = model(calib_ids[:2]).logits
    assert len(specs) == 14 and all(s.weight[0].name == "nvfp4" for s in specs.values())
    assert torch.isfinite(after).all() and not torch.equal(before, after)
    assert model.model.layers[0].self_attn.k_quantizer.amax is not None  # the KV cache was calibrated
