"""Cond stages as stock components (ldm_compat.models.cond_stage) against the original code's outputs.

Ground truth: tests/fixtures/ldm_reference_latent (README there). Text conditioning is compared within 1e-5 (float32
values up to ~4; transformers' eager CLIP attention and torch's MultiheadAttention path give the fixture bit for bit on
this project's machine, other CPUs may differ in the last bits); token ids and round trips are exact.
"""

from __future__ import annotations

import gzip
import json
from functools import cache
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from ldm_compat.models.cond_stage import (
    SUPPORTED_COND_STAGES,
    ClassEmbedderModel,
    TokenizerNotFoundError,
    UnsupportedCondStage,
    build_cond_stage,
    load_cond_stage,
)
from ldm_compat.models.cond_stage.open_clip import known_arch_config, resolve_arch
from ldm_compat.models.cond_stage.tokenizers import clip_bpe_from_open_clip_vocab

FIXTURES = Path(__file__).parent / "fixtures" / "ldm_reference_latent"
TEXT_CASES = ["sd1_kl_clip_eps", "sd2_kl_openclip_v"]
ALL_CASES = [*TEXT_CASES, "cin_vq_class"]
PREFIX = "cond_stage_model."
ATOL = 1e-5


@cache
def _case(name: str):
    config = yaml.safe_load((FIXTURES / f"{name}.yaml").read_text())["model"]["params"]["cond_stage_config"]
    checkpoint = torch.load(FIXTURES / f"{name}.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    state = {k[len(PREFIX) :]: v for k, v in checkpoint.items() if k.startswith(PREFIX)}
    io = load_file(FIXTURES / f"{name}.io.safetensors")
    meta = json.loads((FIXTURES / f"{name}.json").read_text())
    return config, state, io, meta


@cache
def _built(name: str):
    config, state, _, _ = _case(name)
    return build_cond_stage(config, state, search_dirs=[FIXTURES])


def assert_same_state(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        assert got[key].shape == value.shape, key
        assert torch.equal(got[key], value), key


# --- ground truth ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TEXT_CASES)
def test_token_ids_equal_the_originals(name):
    _, _, io, meta = _case(name)
    stage = _built(name)
    assert torch.equal(stage.tokenize(meta["prompts"]), io["cond.token_ids"])
    assert torch.equal(stage.tokenize([meta["scalars"]["uc_prompt"]] * 2), io["cond.uc_token_ids"])


@pytest.mark.parametrize("name", TEXT_CASES)
def test_text_conditioning_equals_the_originals(name):
    _, _, io, meta = _case(name)
    stage = _built(name)
    with torch.no_grad():
        torch.testing.assert_close(stage.encode(meta["prompts"]), io["cond.c"], atol=ATOL, rtol=0)
        torch.testing.assert_close(stage.unconditional(2), io["cond.uc"], atol=ATOL, rtol=0)


def test_class_conditioning_equals_the_originals():
    _, _, io, _ = _case("cin_vq_class")
    stage = _built("cin_vq_class")
    # an embedding lookup copies rows of the checkpoint's table: bit-equal on every machine
    with torch.no_grad():
        torch.testing.assert_close(stage.encode({"class_label": io["batch.class_label"]}), io["cond.c"], atol=0, rtol=0)
        torch.testing.assert_close(stage.encode(io["batch.class_label"]), io["cond.c"], atol=0, rtol=0)
        torch.testing.assert_close(stage.unconditional(2), io["cond.uc"], atol=0, rtol=0)
    assert torch.equal(stage.model.unconditional_labels(2), io["cond.uc_class_label"])


# --- lossless both ways ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CASES)
def test_round_trip_through_a_folder_is_bit_exact(name, tmp_path):
    config, state, _, meta = _case(name)
    stage = _built(name)
    assert_same_state(stage.original_state_dict(), state)
    for sub, component in stage.components.items():
        component.save_pretrained(tmp_path / sub)
    loaded = load_cond_stage(tmp_path, config, stage.kept)
    assert_same_state(loaded.original_state_dict(), state)
    cond = meta["prompts"] or {"class_label": torch.tensor([1, 4])}
    with torch.no_grad():
        assert torch.equal(loaded.encode(cond), stage.encode(cond))


def test_open_clip_keeps_the_skipped_block_and_the_projection():
    _, state, _, _ = _case("sd2_kl_openclip_v")
    stage = _built("sd2_kl_openclip_v")
    assert stage.text_encoder.config.num_hidden_layers == 2  # 3 resblocks, "penultimate"
    assert stage.text_encoder.config.hidden_act == "gelu"
    assert set(stage.kept) == {k for k in state if k.startswith("model.transformer.resblocks.2.")} | {
        "model.text_projection", "model.logit_scale"}  # fmt: skip


def test_stock_classes_alone_reproduce_the_openclip_conditioning(tmp_path):
    """The saved text_encoder/ and tokenizer/ load with transformers only, as diffusers' SD2 folders do."""
    from transformers import CLIPTextModel, CLIPTokenizer

    _, _, io, meta = _case("sd2_kl_openclip_v")
    stage = _built("sd2_kl_openclip_v")
    stage.save_pretrained(tmp_path)
    model = CLIPTextModel.from_pretrained(tmp_path / "text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path / "tokenizer")
    ids = tokenizer(meta["prompts"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(ids.input_ids, io["cond.token_ids"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids.input_ids).last_hidden_state, io["cond.c"], atol=ATOL, rtol=0)


# --- transformers' CLIP layouts ---------------------------------------------------------------------------------------


def _clip_layouts():
    _, state, _, _ = _case("sd1_kl_clip_eps")
    nested = "transformer.text_model."
    without_ids = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    flat = {"transformer." + k[len(nested) :]: v for k, v in without_ids.items()}
    return {"4.19 (nested, position_ids)": state, "4.31 (nested)": without_ids, "5.6 (flat)": flat}


@pytest.mark.parametrize("layout", list(_clip_layouts()))
def test_both_clip_layouts_convert_and_come_back_in_their_own_layout(layout, tmp_path):
    config, _, io, meta = _case("sd1_kl_clip_eps")
    state = _clip_layouts()[layout]
    stage = build_cond_stage(config, state, search_dirs=[FIXTURES])
    with torch.no_grad():
        torch.testing.assert_close(stage.encode(meta["prompts"]), io["cond.c"], atol=ATOL, rtol=0)
    assert_same_state(stage.original_state_dict(), state)
    stage.save_pretrained(tmp_path)
    assert_same_state(load_cond_stage(tmp_path, config, stage.kept).original_state_dict(), state)


def test_checkpoint_position_ids_fill_the_models_buffer():
    """The original copied the checkpoint's position_ids into its int64 buffer (float ones truncate)."""
    config, state, _, _ = _case("sd1_kl_clip_eps")
    key = "transformer.text_model.embeddings.position_ids"
    odd = dict(state, **{key: torch.arange(77, dtype=torch.float32).flip(0)[None] + 0.5})
    stage = build_cond_stage(config, odd, search_dirs=[FIXTURES])
    assert torch.equal(stage.text_encoder.embeddings.position_ids, torch.arange(76, -1, -1)[None])
    assert torch.equal(stage.original_state_dict()[key], odd[key])


def test_half_precision_checkpoint_comes_back_in_half_after_a_float32_cast():
    config, state, _, _ = _case("sd1_kl_clip_eps")
    half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    stage = build_cond_stage(config, half, search_dirs=[FIXTURES]).to(torch.float32)
    assert stage.text_encoder.dtype == torch.float32
    assert_same_state(stage.original_state_dict(), half)


# --- bad input ------------------------------------------------------------------------------------------------------


def test_unknown_target_names_itself_and_the_supported_ones():
    with pytest.raises(UnsupportedCondStage, match=r"'my\.Encoder' is not supported; supported: .*FrozenCLIPEmbedder"):
        build_cond_stage({"target": "my.Encoder", "params": {}}, {}, search_dirs=[])
    assert "ldm.modules.encoders.modules.ClassEmbedder" in SUPPORTED_COND_STAGES


def test_shape_mismatch_names_the_original_key():
    config, state, _, _ = _case("sd1_kl_clip_eps")
    key = "transformer.text_model.final_layer_norm.weight"
    with pytest.raises(ValueError, match=f"{key}: shape \\(16,\\)"):
        build_cond_stage(config, dict(state, **{key: state[key][:16]}), search_dirs=[FIXTURES])


def test_missing_tokenizer_is_one_line_naming_version_places_and_flag(tmp_path):
    config = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder", "params": {"version": "nobody/nothing"}}
    with pytest.raises(TokenizerNotFoundError) as err:
        build_cond_stage(config, None, search_dirs=[tmp_path])
    message = str(err.value)
    assert "\n" not in message and "'nobody/nothing'" in message and str(tmp_path) in message
    assert "--tokenizer" in message


def test_tokenizer_flag_overrides_the_version():
    config, state, io, meta = _case("sd1_kl_clip_eps")
    moved = {**config, "params": {**config["params"], "version": "openai/clip-vit-large-patch14"}}
    stage = build_cond_stage(moved, state, search_dirs=[], tokenizer_path=FIXTURES / "tiny_clip")
    assert stage.text_encoder.config.num_hidden_layers == 2  # the config comes from the --tokenizer folder
    assert torch.equal(stage.tokenize(meta["prompts"]), io["cond.token_ids"])


# --- OpenCLIP tokenizer and arch -------------------------------------------------------------------------------------


def test_open_clip_vocabulary_file_builds_the_clip_bpe(tmp_path):
    """open_clip's bpe_simple_vocab_16e6.txt.gz holds a header line, then the merges (the CLIP BPE)."""
    merges = (FIXTURES / "tiny_clip" / "merges.txt").read_text(encoding="utf-8").split("\n")
    gz = tmp_path / "bpe_simple_vocab_16e6.txt.gz"
    gz.write_bytes(gzip.compress("\n".join(["bpe_simple_vocab_16e6.txt#version: 0.2", *merges[1:]]).encode()))
    vocab, _ = clip_bpe_from_open_clip_vocab(gz)
    assert vocab == json.loads((FIXTURES / "tiny_clip" / "vocab.json").read_text(encoding="utf-8"))
    config, state, io, meta = _case("sd2_kl_openclip_v")
    stage = build_cond_stage(config, state, search_dirs=[FIXTURES], tokenizer_path=gz)
    assert torch.equal(stage.tokenize(meta["prompts"]), io["cond.token_ids"])


def test_open_clip_tokenize_rules():
    """open_clip.tokenize: '!' merges ('!!' is one token, id 748), html entities unescaped, over-long prompts end in
    eot at position 76, padding is 0."""
    stage = _built("sd2_kl_openclip_v")
    ids = stage.tokenize(["wow!! &amp; !", "a " * 100])
    vocab = stage.tokenizer.get_vocab()
    assert ids[0, :6].tolist() == [49406, vocab["wow</w>"], vocab["!!</w>"], vocab["&</w>"], vocab["!</w>"], 49407]
    assert ids[0, 6:].eq(0).all()
    assert ids[1, 0] == 49406 and ids[1, 76] == 49407 and ids[1, 1:76].eq(vocab["a</w>"]).all()


def test_open_clip_arch_lookup(tmp_path):
    assert known_arch_config("ViT-H-14")["text_cfg"] == dict(context_length=77, vocab_size=49408, width=1024,
                                                             heads=16, layers=24)  # fmt: skip
    assert known_arch_config("ViT-bigG-14")["text_cfg"]["heads"] == 20
    custom = tmp_path / "mine.json"
    custom.write_text(json.dumps({"embed_dim": 8, "text_cfg": {"width": 16, "heads": 4, "layers": 1}}))
    assert resolve_arch("ViT-H-14", [], open_clip_config=custom)["text_cfg"]["heads"] == 4  # explicit file wins
    assert resolve_arch("ViT-oracle-tiny", [FIXTURES])["text_cfg"]["layers"] == 3  # open_clip_configs/ beside YAML
    with pytest.raises(ValueError, match="unknown open_clip arch 'ViT-nope'.*--open-clip-config"):
        resolve_arch("ViT-nope", [tmp_path])


def test_open_clip_weights_must_fit_the_arch():
    config, state, _, _ = _case("sd2_kl_openclip_v")
    other = {**config, "params": {**config["params"], "arch": "ViT-B-32"}}
    with pytest.raises(ValueError, match="3 resblocks, arch 'ViT-B-32' 12"):
        build_cond_stage(other, state, search_dirs=[FIXTURES])


# --- from scratch, trivial stages -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CASES)
def test_random_init_has_the_original_keys_shapes_and_order(name):
    config, state, _, _ = _case(name)
    stage = build_cond_stage(config, None, search_dirs=[FIXTURES])
    got = stage.original_state_dict()  # in the layout of the transformers the original pins: with position_ids
    assert {k: (v.shape, v.dtype) for k, v in got.items()} == {k: (v.shape, v.dtype) for k, v in state.items()}
    # a run trained from scratch exports these keys as they come: in the original module's state_dict order
    assert list(got) == list(state)


def test_trivial_cond_stages_have_no_components():
    x = torch.randn(2, 3, 4, 4)
    assert build_cond_stage("__is_unconditional__", None).encode(["a"]) is None
    assert build_cond_stage({"target": "torch.nn.Identity"}, {}).encode(x) is x
    first = build_cond_stage("__is_first_stage__", {"encoder.conv_in.weight": x})
    assert first.components == {} and torch.equal(first.original_state_dict()["encoder.conv_in.weight"], x)
    with pytest.raises(NotImplementedError, match="first_stage"):
        first.encode(x)


# --- ClassEmbedder label dropout (SD2 fork's ucg_rate) ---------------------------------------------------------------


def test_class_embedder_label_dropout_in_training_only_unless_bug_compat():
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    model = ClassEmbedderModel(embed_dim=4, n_classes=10, ucg_rate=0.5)
    null = model.embedding.weight[9]
    assert torch.equal(model.eval()(labels), model.embedding(labels[:, None]))  # the fix: no dropout at sampling
    torch.manual_seed(3)
    keep = 1.0 - torch.bernoulli(torch.full((8, 1), 0.5))  # the original's draw, same generator state
    torch.manual_seed(3)
    out = model.train()(labels)
    want = torch.where(keep.bool()[..., None], model.embedding(labels[:, None]), null)
    assert torch.equal(out, want) and 0 < keep.sum() < 8
    bug = ClassEmbedderModel(embed_dim=4, n_classes=10, ucg_rate=1.0, ldm_bug_compat=True).eval()
    assert torch.equal(bug(labels), bug.embedding.weight[9].expand(8, 1, 4))


# --- the other original layers ----------------------------------------------------------------------------------------


def open_clip_text_forward(state: dict, tokens: torch.Tensor, blocks: int, heads: int) -> torch.Tensor:
    """The SD2 fork's encode_with_transformer written out on open_clip's modules (LND, nn.MultiheadAttention)."""
    m = {k[len("model.") :]: v for k, v in state.items()}
    width = m["ln_final.weight"].shape[0]
    x = (m["token_embedding.weight"][tokens] + m["positional_embedding"]).permute(1, 0, 2)
    mask = torch.full((77, 77), float("-inf")).triu_(1)
    for i in range(blocks):
        p = f"transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(width, heads).eval()
        attn.load_state_dict({k[len(p + "attn.") :]: v for k, v in m.items() if k.startswith(p + "attn.")})
        h = F.layer_norm(x, (width,), m[p + "ln_1.weight"], m[p + "ln_1.bias"])
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (width,), m[p + "ln_2.weight"], m[p + "ln_2.bias"])
        h = F.gelu(F.linear(h, m[p + "mlp.c_fc.weight"], m[p + "mlp.c_fc.bias"]))
        x = x + F.linear(h, m[p + "mlp.c_proj.weight"], m[p + "mlp.c_proj.bias"])
    return F.layer_norm(x.permute(1, 0, 2), (width,), m["ln_final.weight"], m["ln_final.bias"])


@pytest.mark.parametrize("layer, blocks", [("last", 3), ("penultimate", 2)])
def test_open_clip_layers_match_the_original_forward(layer, blocks):
    config, state, io, meta = _case("sd2_kl_openclip_v")
    stage = build_cond_stage({**config, "params": {**config["params"], "layer": layer}}, state, search_dirs=[FIXTURES])
    assert stage.text_encoder.config.num_hidden_layers == blocks
    with torch.no_grad():
        want = open_clip_text_forward(state, io["cond.token_ids"], blocks, heads=2)
        torch.testing.assert_close(stage.encode(meta["prompts"]), want, atol=ATOL, rtol=0)
    assert_same_state(stage.original_state_dict(), state)


def test_clip_pooled_and_hidden_layers():
    """SD2 fork's FrozenCLIPEmbedder: "pooled" = pooler_output (the eot position) b x 1 x d; "hidden" = hidden_states
    [layer_idx] (no final norm, so final_layer_norm of hidden_states[-1] is the fixture's "last")."""
    config, state, io, meta = _case("sd1_kl_clip_eps")

    def stage(**params):
        return build_cond_stage({**config, "params": {**config["params"], **params}}, state, search_dirs=[FIXTURES])

    with torch.no_grad():
        pooled = stage(layer="pooled").encode(meta["prompts"])
        eot = io["cond.token_ids"].argmax(dim=-1)
        torch.testing.assert_close(pooled[:, 0], io["cond.c"][torch.arange(2), eot], atol=ATOL, rtol=0)
        hidden = stage(layer="hidden", layer_idx=-1)
        last = hidden.text_encoder.final_layer_norm(hidden.encode(meta["prompts"]))
        torch.testing.assert_close(last, io["cond.c"], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="layer_idx"):
        stage(layer="hidden")


def test_version_found_in_the_hub_cache(tmp_path, monkeypatch):
    """A Hub id in the YAML resolves to its cached snapshot (no network): refs/main → snapshots/<commit>/."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--openai--clip-vit-large-patch14"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    shutil.copytree(FIXTURES / "tiny_clip", repo / "snapshots" / ("0" * 40))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    config, state, io, meta = _case("sd1_kl_clip_eps")
    published = {**config, "params": {**config["params"], "version": "openai/clip-vit-large-patch14"}}
    stage = build_cond_stage(published, state, search_dirs=[tmp_path])
    assert stage.text_encoder.config.num_hidden_layers == 2  # the cached config.json, not the published numbers
    assert torch.equal(stage.tokenize(meta["prompts"]), io["cond.token_ids"])
