"""Models whose layers differ in kind (Gemma 2/3: sliding-window and full attention; Nemotron-H: Mamba-2,
attention, MLP and MoE blocks): each layer is calibrated with the arguments the model gives that kind of layer
(its own mask), so the layer-by-layer pass computes the model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from lowbit.algorithms.layerwise import _capture_inputs

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("per_layer", [True, False])
def test_layer_by_layer_forward_with_each_layers_arguments_is_the_model(tiny_factory, per_layer):
    src = tiny_factory("gemma2", 2, sliding_window=4)  # layer 0 slides over 4 tokens, layer 1 sees all 16
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    layers = model.model.layers
    ids = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids, output_hidden_states=True).hidden_states
        states, kwargs = _capture_inputs(model, layers, [{"input_ids": ids}], torch.device("cpu"), per_layer)
        h = states[0][0]
        for i, layer in enumerate(layers):
            out = layer(h, **(kwargs[i][0] if kwargs is not None else states[0][1]))
            h = out[0] if isinstance(out, tuple) else out
        final = model.model.norm(h)  # hidden_states[-1] is after the final norm
    if per_layer:
        assert kwargs is not None and kwargs[1] is not kwargs[0]  # the two kinds of layer got their own
        torch.testing.assert_close(final, want[-1], rtol=0, atol=1e-5)
    else:  # layer 0's sliding-window mask given to the full-attention layer 1 changes its output
        assert not torch.allclose(final, want[-1], atol=1e-3)


def test_families_with_layers_of_different_kinds_record_each_layers_arguments():
    from lowbit.models.families import family

    assert all(family(t).per_layer_kwargs for t in ("gemma2", "gemma3_text", "nemotron_h"))
    assert not family("llama").per_layer_kwargs  # every layer gets the same: recorded once
