"""pipeline.models.importance: the angular distance of runs of layers (Gromov et al. 2024) on tiny Llamas whose
layers are built so that the answer is known: a run whose residual branches are zeroed passes the stream through
unchanged (distance 0) and must be the run chosen."""

from __future__ import annotations

import math
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")

from pipeline.models import importance as I  # noqa: E402


def tiny_llama(layers: int = 6, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # updates as large as the stream, so every real layer turns it by a clear angle
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model


def pass_through(model, layers) -> None:
    """Zero the residual branches' output projections: the layer adds nothing to the stream."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()


def batches(n: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 16), generator=gen) for _ in range(n)]


def test_candidate_starts():
    assert I.candidate_starts(6, 2) == [0, 1, 2, 3]  # the last layer (5) stays
    assert I.candidate_starts(6, 2, keep_last_layer=False) == [0, 1, 2, 3, 4]
    assert I.candidate_starts(2, 1) == [0]
    for n, run in ((4, 4), (4, 0)):
        with pytest.raises(ValueError, match="keep at least one layer"):
            I.candidate_starts(n, run)


def test_angular_distance_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    b = torch.tensor([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]])
    assert torch.allclose(I.angular_distance(a, b), torch.tensor([0.0, 0.5, 1.0, 0.0]), atol=1e-6)


def test_pass_through_run_scores_zero_and_is_chosen():
    model = tiny_llama(6)
    pass_through(model, [2, 3])
    scores = I.run_scores(model, batches(), 2)
    assert sorted(scores) == [0, 1, 2, 3]
    assert scores[2] < 1e-6  # h_2 == h_4 exactly: the stream passes through
    assert min(v for s, v in scores.items() if s != 2) > 0.05
    assert I.least_important_run(scores) == 2
    # a single layer of the pass-through run also scores ~0 (the shallowest such run wins a tie)
    one = I.run_scores(model, batches(), 1)
    assert one[2] < 1e-6 and one[3] < 1e-6 and I.least_important_run(one) == 2


def test_scores_match_the_hidden_states_transformers_reports():
    """The hooks see exactly the residual stream: for runs that end below the last layer, the mean over every token
    of arccos(cos) / pi computed from output_hidden_states (h_0 .. h_{L-1} there are the layers' inputs)."""
    model = tiny_llama(5, seed=3)
    data = batches(2, seed=4)
    got = I.run_scores(model, data, 2)
    sums = [0.0] * 5
    count = 0
    with torch.no_grad():
        for ids in data:
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
            for s in range(2):  # starts whose run ends below the final (normed) entry
                cos = torch.nn.functional.cosine_similarity(hs[s], hs[s + 2], dim=-1)
                sums[s] += float((torch.arccos(cos.clamp(-1, 1)) / math.pi).sum())
            count += ids.numel()
    for s in range(2):
        assert got[s] == pytest.approx(sums[s] / count, rel=1e-4)


def test_last_layer_is_kept_unless_asked():
    model = tiny_llama(5, seed=2)
    pass_through(model, [3, 4])  # the cheapest run ends at the last layer
    kept = I.run_scores(model, batches(), 2)
    assert 3 not in kept and I.least_important_run(kept) != 3
    anywhere = I.run_scores(model, batches(), 2, keep_last_layer=False)
    assert anywhere[3] < 1e-6 and I.least_important_run(anywhere) == 3


def test_probe_rides_along_the_perplexity_pass_and_unhooks():
    """The init stage measures perplexity with shard_loss inside RunDistance: one pass gives both; afterwards no
    hook is left on the model."""
    from pipeline.evaluation.perplexity import shard_loss

    class Blocks:
        uri, split = "mem://", "val"

        def __init__(self, data):
            self.data = data

        def __len__(self):
            return len(self.data)

        def block(self, i):
            return self.data[i].numpy()

    model = tiny_llama(4)
    pass_through(model, [1])
    data = torch.cat(batches(3))
    with I.RunDistance(model, 1) as probe:
        ppl = shard_loss(model, Blocks(data), max_blocks=None, batch_size=4, device="cpu")
    assert probe.tokens == ppl["tokens"] + len(data)  # every position is scored; the loss skips each first token
    assert I.least_important_run(probe.scores()) == 1
    assert probe.scores() == pytest.approx(I.run_scores(model, [data], 1), abs=1e-6)
    layers = model.model.layers
    assert not layers[0]._forward_pre_hooks and not any(layer._forward_hooks for layer in layers)
    with pytest.raises(ValueError, match="no forward pass"):
        I.RunDistance(model, 1).scores()


def test_downscale_config():
    from pydantic import ValidationError

    from pipeline.stages.init import DownScale, InitConfig

    cfg = InitConfig(preset="tiny", num_layers=6, scale={"mode": "down", "target_layers": 4},
                     validation={"artifact": "shards"})
    assert isinstance(cfg.scale, DownScale) and cfg.scale.select is None and cfg.scale.keep_last_layer is None  # defaults
    assert cfg.validation.split == "val" and cfg.validation.max_blocks == 32
    assert InitConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # manifests round-trip
    from pipeline.stages.init import STAGE

    assert STAGE.inputs(cfg) == ["tokenizer", "shards"] and STAGE.inputs(InitConfig(preset="tiny")) == ["tokenizer"]
    hand = InitConfig(preset="tiny", scale={"mode": "down", "drop_layers": [1, 0]})
    assert hand.scale.drop_layers == [0, 1] and hand.scale.target_layers is None
    assert InitConfig.model_validate(hand.model_dump(mode="json")) == hand
    # a pretrained model's depth is known only when it is read: the stage checks target_layers then
    InitConfig(source="pretrained", pretrained_path="x", scale={"mode": "down", "target_layers": 40},
               validation={"artifact": "shards"})
    bad = [
        ({"scale": {"mode": "down", "target_layers": 1}}, "validation: {artifact: shards}"),
        ({"scale": {"mode": "down", "target_layers": 6}, "validation": {"artifact": "shards"}}, "below the model's 6"),
        ({"scale": {"mode": "down", "target_layers": 0}, "validation": {"artifact": "shards"}}, "greater than or equal"),
        ({"scale": {"mode": "down"}}, "got neither"),
        ({"scale": {"mode": "down", "drop_layers": [1], "target_layers": 3}}, "got both"),
        ({"scale": {"mode": "down", "drop_layers": [1], "keep_last_layer": False}}, "keep_last_layer apply"),
        ({"scale": {"mode": "down", "target_layers": 3, "select": "random"}, "validation": {"artifact": "shards"}},
         "importance"),
        ({"validation": {"artifact": "../x"}}, "pattern"),
    ]
    for fields, message in bad:
        with pytest.raises(ValidationError, match=message):
            InitConfig(preset="tiny", num_layers=6, **fields)
