"""init's depth-scaled option: the residual output projections start at initializer_range / sqrt(2 x layers), every
other weight as with the plain N(0, initializer_range) init, drawn identically from the same seed."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.stages.init import RESIDUAL_OUTPUTS, InitConfig, _random_model

IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 0}


def _model(**over):
    cfg = InitConfig(source="random", preset="tiny", num_layers=4, hidden_size=128, intermediate_size=256, **over)
    return _random_model(cfg, 512, IDS)


def test_depth_scaled_residual_outputs_and_nothing_else():
    plain, plain_info = _model()
    scaled, info = _model(init_std="depth_scaled")
    layers = scaled.config.num_hidden_layers
    assert info == {"init_std": "depth_scaled", "initializer_range": 0.02, "residual_out_std": 0.02 / math.sqrt(2 * layers)}
    assert plain_info["residual_out_std"] == 0.02
    residual = {f"model.layers.{i}.{name}.weight" for i in range(layers) for name in RESIDUAL_OUTPUTS}
    plain_params, scaled_params = dict(plain.named_parameters()), dict(scaled.named_parameters())
    for name, w in scaled_params.items():
        if name in residual:
            assert w.std().item() == pytest.approx(info["residual_out_std"], rel=0.05), name
            assert plain_params[name].std().item() == pytest.approx(0.02, rel=0.05), name
        else:  # the same draw as the plain init: only the residual outputs were redrawn, after everything else
            assert torch.equal(w, plain_params[name]), name
    assert len(residual) == 2 * layers


def test_init_std_is_for_random_weights_only():
    with pytest.raises(ValueError, match="init_std applies to source: random"):
        InitConfig(source="pretrained", pretrained_path="/x", init_std="depth_scaled")
