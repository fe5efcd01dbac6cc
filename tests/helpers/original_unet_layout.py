"""The state-dict layout (ordered key → shape) of the ORIGINAL openaimodel ``UNetModel`` for a config, by its rules.

Written from the structure of CompVis/latent-diffusion and Stability-AI/stablediffusion
``ldm/modules/diffusionmodules/openaimodel.py`` (``UNetModel.__init__``, ``ResBlock``, ``Downsample``, ``Upsample``,
``AttentionBlock``) and ``ldm/modules/attention.py`` (``SpatialTransformer``, ``BasicTransformerBlock``,
``CrossAttention``, ``FeedForward``/``GEGLU``): independent of ``ldm_compat``'s model code, it is the oracle the
converter fuzz test compares against. Checked against the layouts of the published configs (sha256 of the original
code's ``key:shape`` lines) in ``test_reliability_fuzz_convert.py``.
"""

from __future__ import annotations

DEFAULTS = {
    "dropout": 0, "channel_mult": (1, 2, 4, 8), "conv_resample": True, "dims": 2, "num_classes": None,
    "num_heads": -1, "num_head_channels": -1, "num_heads_upsample": -1, "use_scale_shift_norm": False,
    "resblock_updown": False, "use_new_attention_order": False, "use_spatial_transformer": False,
    "transformer_depth": 1, "context_dim": None, "n_embed": None, "legacy": True, "disable_self_attentions": None,
    "num_attention_blocks": None, "disable_middle_self_attn": False, "use_linear_in_transformer": False,
    "adm_in_channels": None,
}  # fmt: skip


def original_unet_layout(params: dict) -> dict[str, tuple[int, ...]]:
    """Ordered ``{key: shape}`` of the original ``UNetModel(**params).state_dict()`` (keys without a prefix)."""
    p = {**DEFAULTS, **params}
    mc, dims, mults = p["model_channels"], p["dims"], list(p["channel_mult"])
    levels = len(mults)
    nrb = [p["num_res_blocks"]] * levels if isinstance(p["num_res_blocks"], int) else list(p["num_res_blocks"])
    ted = 4 * mc
    keys: dict[str, tuple[int, ...]] = {}

    def conv(name, cin, cout, k, d=dims):
        keys[f"{name}.weight"] = (cout, cin, *([k] * d))
        keys[f"{name}.bias"] = (cout,)

    def linear(name, cin, cout, bias=True):
        keys[f"{name}.weight"] = (cout, cin)
        if bias:
            keys[f"{name}.bias"] = (cout,)

    def norm(name, c):
        keys[f"{name}.weight"] = (c,)
        keys[f"{name}.bias"] = (c,)

    def resblock(name, cin, cout=None):
        cout = cout or cin
        norm(f"{name}.in_layers.0", cin)
        conv(f"{name}.in_layers.2", cin, cout, 3)
        linear(f"{name}.emb_layers.1", ted, 2 * cout if p["use_scale_shift_norm"] else cout)
        norm(f"{name}.out_layers.0", cout)
        conv(f"{name}.out_layers.3", cout, cout, 3)
        if cout != cin:
            conv(f"{name}.skip_connection", cin, cout, 1)  # use_conv is never set by UNetModel: a 1×1 conv

    def heads_and_width(ch):
        if p["num_head_channels"] == -1:
            heads, dim_head = p["num_heads"], ch // p["num_heads"]
        else:
            heads, dim_head = ch // p["num_head_channels"], p["num_head_channels"]
        if p["legacy"]:
            dim_head = ch // heads  # what a SpatialTransformer gets (an AttentionBlock's shapes do not depend on it)
        return heads, dim_head

    def attention(name, ch, disable_self_attn):
        norm(f"{name}.norm", ch)
        if not p["use_spatial_transformer"]:
            conv(f"{name}.qkv", ch, 3 * ch, 1, d=1)
            conv(f"{name}.proj_out", ch, ch, 1, d=1)
            return
        heads, dim_head = heads_and_width(ch)
        inner = heads * dim_head
        if p["use_linear_in_transformer"]:
            linear(f"{name}.proj_in", ch, inner)
        else:
            conv(f"{name}.proj_in", ch, inner, 1, d=2)
        for d in range(p["transformer_depth"]):
            context = p["context_dim"][d] if isinstance(p["context_dim"], (list, tuple)) else p["context_dim"]
            block = f"{name}.transformer_blocks.{d}"
            for attn, kv in (("attn1", context if disable_self_attn else inner), ("attn2", context)):
                linear(f"{block}.{attn}.to_q", inner, inner, bias=False)
                linear(f"{block}.{attn}.to_k", kv, inner, bias=False)
                linear(f"{block}.{attn}.to_v", kv, inner, bias=False)
                linear(f"{block}.{attn}.to_out.0", inner, inner)
                if attn == "attn1":  # registration order: attn1, ff, attn2, norm1-3
                    linear(f"{block}.ff.net.0.proj", inner, 8 * inner)  # GEGLU: 2 × (4 × inner)
                    linear(f"{block}.ff.net.2", 4 * inner, inner)
            for i in (1, 2, 3):
                norm(f"{block}.norm{i}", inner)
        if p["use_linear_in_transformer"]:
            linear(f"{name}.proj_out", ch, inner)  # Stability-AI: nn.Linear(in_channels, inner_dim), as written
        else:
            conv(f"{name}.proj_out", inner, ch, 1, d=2)

    def has_attention(ds, level, index):
        limit = p["num_attention_blocks"]
        return ds in p["attention_resolutions"] and (limit is None or index < limit[level])

    def disabled(level):
        return bool(p["disable_self_attentions"][level]) if p["disable_self_attentions"] is not None else False

    linear("time_embed.0", mc, ted)
    linear("time_embed.2", ted, ted)
    if p["num_classes"] == "continuous":
        linear("label_emb", 1, ted)
    elif p["num_classes"] == "sequential":
        linear("label_emb.0.0", p["adm_in_channels"], ted)
        linear("label_emb.0.2", ted, ted)
    elif p["num_classes"] is not None:
        keys["label_emb.weight"] = (p["num_classes"], ted)

    conv("input_blocks.0.0", p["in_channels"], mc, 3)
    chans, ch, ds, index = [mc], mc, 1, 1
    for level, mult in enumerate(mults):
        for nr in range(nrb[level]):
            resblock(f"input_blocks.{index}.0", ch, mult * mc)
            ch = mult * mc
            if has_attention(ds, level, nr):
                attention(f"input_blocks.{index}.1", ch, disabled(level))
            chans.append(ch)
            index += 1
        if level != levels - 1:
            if p["resblock_updown"]:
                resblock(f"input_blocks.{index}.0", ch)
            elif p["conv_resample"]:
                conv(f"input_blocks.{index}.0.op", ch, ch, 3)
            chans.append(ch)
            ds *= 2
            index += 1

    resblock("middle_block.0", ch)
    attention("middle_block.1", ch, p["disable_middle_self_attn"])
    resblock("middle_block.2", ch)

    index = 0
    for level, mult in reversed(list(enumerate(mults))):
        for i in range(nrb[level] + 1):
            resblock(f"output_blocks.{index}.0", ch + chans.pop(), mc * mult)
            ch, layer = mc * mult, 1
            if has_attention(ds, level, i):
                attention(f"output_blocks.{index}.{layer}", ch, disabled(level))
                layer += 1
            if level and i == nrb[level]:
                if p["resblock_updown"]:
                    resblock(f"output_blocks.{index}.{layer}", ch)
                elif p["conv_resample"]:
                    conv(f"output_blocks.{index}.{layer}.conv", ch, ch, 3)
                ds //= 2
            index += 1

    norm("out.0", ch)
    conv("out.2", mc, p["out_channels"], 3)
    if p["n_embed"] is not None:
        norm("id_predictor.0", ch)
        conv("id_predictor.1", mc, p["n_embed"], 1)
    return keys
