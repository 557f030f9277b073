"""Document masking for packed pretraining: position ids that restart per document keep attention inside each
document (the model's output for a document does not depend on what precedes it in the block), for the kernels
that run here (sdpa, eager) and for the flattened one-row form that flash-attention's varlen path reads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.packed import document_positions, flatten_rows
from pipeline.training.pretrain import Collate

BOS, EOS = 1, 2


def test_positions_restart_at_bos_and_after_eos():
    ids = torch.tensor([[7, 8, EOS, BOS, 5, 6, EOS, BOS, 9],
                        [BOS, 5, EOS, BOS, EOS, BOS, 4, 4, 4]])
    assert document_positions(ids, bos_id=BOS, eos_id=EOS).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0, 1],
        [0, 1, 2, 0, 1, 0, 1, 2, 3]]
    # framed by eos only: a document starts right after each eos
    ids = torch.tensor([[7, EOS, 5, 6, EOS, 9]])
    assert document_positions(ids, bos_id=None, eos_id=EOS).tolist() == [[0, 1, 0, 1, 2, 0]]
    # framed by bos only
    assert document_positions(torch.tensor([[7, BOS, 5, BOS]]), bos_id=BOS, eos_id=None).tolist() == [[0, 0, 1, 0]]
    # nothing framed: one document per row, plain positions
    assert document_positions(torch.tensor([[7, 8, 9]]), bos_id=None, eos_id=None).tolist() == [[0, 1, 2]]


def _model(attn: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS, eos_token_id=EOS,
                      use_cache=False)  # as pretrain loads it: with a cache, transformers builds no packed mask
    return LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=torch.float64).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_a_document_sees_only_itself(attn):
    model = _model(attn)
    doc_a = [BOS, 10, 11, 12, 13, EOS]
    doc_b = [BOS, 20, 21, 22, EOS]
    block = torch.tensor([doc_a + doc_b])
    alone = model(input_ids=torch.tensor([doc_b])).logits[0]
    masked = model(input_ids=block, position_ids=document_positions(block, bos_id=BOS, eos_id=EOS)).logits[0]
    whole = model(input_ids=block).logits[0]
    n = len(doc_a)
    torch.testing.assert_close(masked[n:], alone, rtol=1e-6, atol=1e-6)  # b as if it were alone
    torch.testing.assert_close(masked[:n], whole[:n], rtol=1e-6, atol=1e-6)  # a is causal either way
    assert (whole[n:] - alone).abs().max() > 1e-3  # without masking b attends to a (and has later positions)


def test_flattened_rows_give_the_loss_of_the_batch():
    model = _model("sdpa")
    torch.manual_seed(1)
    ids = torch.randint(3, 64, (3, 16))
    ids[:, 5] = EOS
    ids[:, 6] = BOS
    ids[1, 0] = BOS
    batch = {"input_ids": ids, "labels": ids.clone(), "position_ids": document_positions(ids, bos_id=BOS, eos_id=EOS)}
    flat = flatten_rows(batch)
    assert flat["input_ids"].shape == (1, 48) and flat["labels"][0, [16, 32]].tolist() == [-100, -100]
    rows = model(**batch).loss
    one = model(**flat).loss
    torch.testing.assert_close(one, rows, rtol=1e-6, atol=1e-6)
    # each row's logits are its own: the flattened row restarts positions at every row
    logits_rows = model(input_ids=ids, position_ids=batch["position_ids"]).logits
    logits_flat = model(input_ids=flat["input_ids"], position_ids=flat["position_ids"]).logits
    torch.testing.assert_close(logits_flat.reshape(3, 16, -1), logits_rows, rtol=1e-6, atol=1e-6)


def test_collate_adds_positions_only_when_masking():
    items = [{"input_ids": torch.tensor([BOS, 5, EOS, BOS]), "sample_id": 3},
             {"input_ids": torch.tensor([6, EOS, BOS, 7]), "sample_id": 4}]
    plain = Collate(BOS, EOS)(items)
    assert set(plain) == {"input_ids", "labels", "sample_id", "phase"}
    masked = Collate(BOS, EOS, document_masking=True)(items)
    assert masked["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    flat = Collate(BOS, EOS, document_masking=True, flatten=True)(items)
    assert flat["input_ids"].shape == (1, 8) and flat["position_ids"].tolist() == [[0, 1, 2, 0, 0, 1, 0, 1]]
    assert flat["sample_id"].tolist() == [3, 4]
