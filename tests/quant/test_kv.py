"""The KV-quantizing attention is known to transformers only where lowbit uses it, never after."""

import subprocess
import sys

import torch

from lowbit.quant.kv import KV_ATTENTION, kv_attention, use_kv_attention


def _registered() -> tuple[bool, bool]:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return KV_ATTENTION in ALL_ATTENTION_FUNCTIONS, KV_ATTENTION in ALL_MASK_ATTENTION_FUNCTIONS


def test_importing_kv_leaves_transformers_attention_tables_unchanged():
    code = (
        "from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS as A\n"
        "from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as M\n"
        "before = (sorted(A), sorted(M))\n"
        "import lowbit.quant.kv, lowbit.loader, lowbit.cli\n"
        "assert (sorted(A), sorted(M)) == before, 'import changed the attention tables'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_scopes_nest_and_leave_nothing_behind():
    assert _registered() == (False, False)
    with kv_attention():
        assert _registered() == (True, True)
        with kv_attention():
            assert _registered() == (True, True)
        assert _registered() == (True, True)
    assert _registered() == (False, False)


def test_a_kv_quantized_model_registers_only_while_it_runs(tiny_llama, calib_ids):
    from transformers import AutoModelForCausalLM

    from lowbit.quant import preset
    from lowbit.quant.convert import convert, set_calibrating

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    convert(model, preset("fp8").with_kv_cache("fp8"))
    use_kv_attention(model)
    seen = []
    attention = model.model.layers[0].self_attn
    hook = attention.k_quantizer.register_forward_pre_hook(lambda *_: seen.append(_registered()))
    set_calibrating(model, True)  # quantizers observe and pass their inputs through (no statistics yet)
    with torch.no_grad():
        model(calib_ids[:1, :8])
        attention(  # one layer's attention called on its own, as layer-by-layer calibration does
            torch.zeros(1, 8, model.config.hidden_size),
            position_embeddings=model.model.rotary_emb(torch.zeros(1, 8), torch.arange(8)[None]),
            attention_mask=None,
        )
    hook.remove()
    assert seen == [(True, True), (True, True)]  # the quantizer ran inside the scope each time
    assert _registered() == (False, False)
