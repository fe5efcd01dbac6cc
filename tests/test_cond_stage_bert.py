"""CompVis ``BERTEmbedder`` → diffusers ``LDMBertModel``: no fixture exists, so the expectation is an independent
re-statement of the original x-transformers forward (ldm/modules/x_transformer.py: TransformerWrapper + Encoder with
its defaults) on random tensors stored under the original keys."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ldm_compat.models.cond_stage import TokenizerNotFoundError, build_cond_stage, load_cond_stage

DIM, DEPTH, VOCAB, SEQ = 16, 2, 40, 7
HEADS, DIM_HEAD = 8, 64  # x-transformers' defaults: inner width 512 whatever DIM is
TARGET = "ldm.modules.encoders.modules.BERTEmbedder"


def original_state(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the original TransformerWrapper's state dict (in its order)."""
    inner = HEADS * DIM_HEAD
    shapes = {"transformer.token_emb.weight": (VOCAB, DIM), "transformer.pos_emb.emb.weight": (SEQ, DIM)}
    for i in range(DEPTH):
        a, f = f"transformer.attn_layers.layers.{2 * i}.", f"transformer.attn_layers.layers.{2 * i + 1}."
        shapes.update({a + "0.weight": (DIM,), a + "0.bias": (DIM,), a + "1.to_q.weight": (inner, DIM),
                       a + "1.to_k.weight": (inner, DIM), a + "1.to_v.weight": (inner, DIM),
                       a + "1.to_out.weight": (DIM, inner), a + "1.to_out.bias": (DIM,),
                       f + "0.weight": (DIM,), f + "0.bias": (DIM,), f + "1.net.0.0.weight": (4 * DIM, DIM),
                       f + "1.net.0.0.bias": (4 * DIM,), f + "1.net.2.weight": (DIM, 4 * DIM),
                       f + "1.net.2.bias": (DIM,)})  # fmt: skip
    shapes.update({"transformer.norm.weight": (DIM,), "transformer.norm.bias": (DIM,),
                   "transformer.to_logits.weight": (VOCAB, DIM), "transformer.to_logits.bias": (VOCAB,)})  # fmt: skip
    return {k: torch.randn(s, generator=generator) * 0.3 for k, s in shapes.items()}


def x_transformer_embeddings(sd: dict, tokens: torch.Tensor) -> torch.Tensor:
    """TransformerWrapper(tokens, return_embeddings=True) of the original, written out."""

    def norm(x, name):
        return F.layer_norm(x, (DIM,), sd[name + ".weight"], sd[name + ".bias"])

    b, n = tokens.shape
    x = sd["transformer.token_emb.weight"][tokens] + sd["transformer.pos_emb.emb.weight"][torch.arange(n)][None]
    for i in range(DEPTH):
        a, f = f"transformer.attn_layers.layers.{2 * i}.", f"transformer.attn_layers.layers.{2 * i + 1}."
        h = norm(x, a + "0")
        q, k, v = (
            (h @ sd[a + f"1.to_{p}.weight"].T).reshape(b, n, HEADS, DIM_HEAD).transpose(1, 2) for p in "qkv"
        )  # b h n d
        attn = (torch.einsum("bhid,bhjd->bhij", q, k) * DIM_HEAD**-0.5).softmax(dim=-1)
        out = torch.einsum("bhij,bhjd->bhid", attn, v).transpose(1, 2).reshape(b, n, HEADS * DIM_HEAD)
        x = F.linear(out, sd[a + "1.to_out.weight"], sd[a + "1.to_out.bias"]) + x
        h = F.gelu(F.linear(norm(x, f + "0"), sd[f + "1.net.0.0.weight"], sd[f + "1.net.0.0.bias"]))
        x = F.linear(h, sd[f + "1.net.2.weight"], sd[f + "1.net.2.bias"]) + x
    return norm(x, "transformer.norm")


def config(**params):
    return {"target": TARGET, "params": {"n_embed": DIM, "n_layer": DEPTH, "vocab_size": VOCAB, "max_seq_len": SEQ,
                                         "use_tokenizer": False, **params}}  # fmt: skip


def test_ldm_bert_round_trip_and_numerics(tmp_path):
    state = original_state(torch.Generator().manual_seed(0))
    stage = build_cond_stage(config(), state, search_dirs=[])
    assert type(stage.bert).__name__ == "LDMBertModel" and stage.kept == {}
    back = stage.original_state_dict()
    assert list(back) == list(state)  # the original's own order, too
    assert all(torch.equal(back[k], v) and back[k].dtype == v.dtype for k, v in state.items())
    tokens = torch.randint(0, VOCAB, (3, SEQ), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = stage.encode(tokens)
        torch.testing.assert_close(got, x_transformer_embeddings(state, tokens), atol=1e-5, rtol=0)
        stage.save_pretrained(tmp_path)
        loaded = load_cond_stage(tmp_path, config(), stage.kept)
        assert torch.equal(loaded.encode(tokens), got)
    assert all(torch.equal(loaded.original_state_dict()[k], v) for k, v in state.items())


def test_ldm_bert_config_follows_the_original_params():
    stage = build_cond_stage(config(), None, search_dirs=[])
    cfg = stage.bert.config
    assert (cfg.d_model, cfg.encoder_layers, cfg.encoder_ffn_dim, cfg.vocab_size) == (DIM, DEPTH, 4 * DIM, VOCAB)
    assert (cfg.max_position_embeddings, cfg.encoder_attention_heads, cfg.head_dim) == (SEQ, HEADS, DIM_HEAD)
    assert set(stage.original_state_dict()) == set(original_state(torch.Generator()))
    with pytest.raises(ValueError, match="embedding_dropout=0.1"):
        build_cond_stage(config(embedding_dropout=0.1), None, search_dirs=[])


def test_bert_tokenizer_from_a_local_folder(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "cat"]) + "\n")
    state = original_state(torch.Generator().manual_seed(0))
    stage = build_cond_stage(config(use_tokenizer=True), state, search_dirs=[], tokenizer_path=tmp_path)
    assert stage.tokenize(["A cat", "a a a a a a a a"]).tolist() == [[2, 5, 6, 3, 0, 0, 0], [2, 5, 5, 5, 5, 5, 3]]
    assert stage.unconditional(2).shape == (2, SEQ, DIM)


def test_missing_bert_tokenizer_says_what_and_the_flag(tmp_path):
    with pytest.raises(TokenizerNotFoundError, match=r"version 'bert-base-uncased'.*--tokenizer"):
        build_cond_stage(config(use_tokenizer=True), None, search_dirs=[tmp_path])
