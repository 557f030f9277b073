"""Weight decay groups are the same with and without ZeRO offload (pipeline.training.common.DecayGroups).

Without an "optimizer" block in the DeepSpeed config the Trainer's own create_optimizer builds the groups; with one
(the shipped zero*-offload.json) transformers hands accelerate a DummyOptim over a flat list of every parameter,
which DeepSpeed would decay as one group. Both paths must give norms, biases and embeddings no decay.
"""

from __future__ import annotations

import torch
from accelerate.utils import DummyOptim
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from pipeline.training.common import DecayGroups, decay_parameter_names, optimizer_param_groups


class _Trainer(DecayGroups, Trainer):
    pass


def _model(tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied,
                                        attention_bias=True))


def _groups(params_or_groups, model) -> dict[float, set[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in params_or_groups}


def test_norms_biases_and_embeddings_are_not_decayed():
    model = _model()
    decay = set(decay_parameter_names(model))
    assert decay and all(n.endswith(("proj.weight",)) for n in decay), decay
    names = {n for n, _ in model.named_parameters()}
    assert "model.embed_tokens.weight" in names - decay                     # embeddings (and the tied head)
    assert {n for n in names if "norm" in n} and not {n for n in names if "norm" in n} & decay  # RMSNorm weights
    assert {n for n in names if n.endswith(".bias")} and not {n for n in names if n.endswith(".bias")} & decay
    untied = _model(tied=False)
    assert "lm_head.weight" in decay_parameter_names(untied)                 # an untied output head is decayed


def test_same_groups_with_and_without_an_optimizer_block(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), weight_decay=0.1, learning_rate=1e-3, use_cpu=True,
                             report_to="none")
    # no optimizer block: the Trainer creates torch AdamW from get_decay_parameter_names
    plain = _Trainer(model=_model(), args=args)
    opt = plain.create_optimizer()
    without = _groups(opt.param_groups, plain.model)
    # an optimizer block: deepspeed_init has set a DummyOptim over every parameter before create_optimizer runs
    model = _model()
    ds = _Trainer(model=model, args=args)
    ds.optimizer = DummyOptim(params=list(model.parameters()), lr=1e-3, weight_decay=0.1)
    assert ds.create_optimizer() is ds.optimizer
    with_block = _groups(ds.optimizer.params, model)
    assert without == with_block
    assert set(without) == {0.0, 0.1}
    assert without[0.1] == set(decay_parameter_names(model))
    assert without[0.0] == {n for n, _ in model.named_parameters()} - without[0.1]
    # frozen parameters are in neither group
    model.model.embed_tokens.weight.requires_grad_(False)
    assert "model.embed_tokens.weight" not in set().union(*_groups(optimizer_param_groups(model, 0.1), model).values())
