"""``ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder`` (Stability-AI fork, SD2) as the stock layout diffusers'
SD2 folders use: a transformers ``CLIPTextModel`` whose ``last_hidden_state`` is the original's output.

The original runs open_clip's text tower by hand: ``token_embedding(tokens) + positional_embedding``, the first
``layers - layer_idx`` resblocks (``layer_idx`` 0 for "last", 1 for "penultimate") with the causal ``attn_mask``, then
``ln_final``. A resblock is ``x + attn(ln_1(x))``, ``x + mlp(ln_2(x))`` with ``nn.MultiheadAttention`` (one packed
``in_proj`` = rows q, k, v) and ``c_fc`` → GELU (QuickGELU for ``quick_gelu`` archs and OpenAI weights) → ``c_proj``:
exactly a ``CLIPTextModel`` layer with ``num_hidden_layers = layers - layer_idx`` and ``final_layer_norm = ln_final``.
The blocks it skips, ``text_projection`` and ``logit_scale`` (and any other tensor the text path does not read) are
kept verbatim for export. The head count is not in the weights: it comes from the ``arch`` (an open_clip model config).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch

from .base import TextEncoderStage, assign_state, check_materialized, meta_init, set_buffer
from .clip import model_root
from .tokenizers import OpenCLIPTokenize, open_clip_tokenizer

logger = logging.getLogger(__name__)

TARGET = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
LAYER_IDX = {"last": 0, "penultimate": 1}
ROOT = "model."
BLOCKS = "model.transformer.resblocks."

# the text towers of published open_clip model configs (facts from open_clip's model_configs/*.json):
# arch → (embed_dim, width, heads, layers); all have context_length 77, vocab_size 49408
KNOWN_ARCHS = {
    "ViT-H-14": (1024, 1024, 16, 24), "ViT-H-16": (1024, 1024, 16, 24), "ViT-g-14": (1024, 1024, 16, 24),
    "ViT-bigG-14": (1280, 1280, 20, 32),
    "ViT-L-14": (768, 768, 12, 12), "ViT-L-14-336": (768, 768, 12, 12), "ViT-L-14-280": (768, 768, 12, 12),
    "ViT-L-16": (768, 768, 12, 12), "ViT-L-16-320": (768, 768, 12, 12),
    "ViT-B-32": (512, 512, 8, 12), "ViT-B-16": (512, 512, 8, 12),
    "ViT-B-16-plus": (640, 640, 10, 12), "ViT-B-16-plus-240": (640, 640, 10, 12),
    "ViT-B-32-plus-256": (640, 640, 10, 12),
}  # fmt: skip
QUICK_GELU_ARCHS = {"ViT-B-32-quickgelu": "ViT-B-32", "ViT-B-16-quickgelu": "ViT-B-16",
                    "ViT-L-14-quickgelu": "ViT-L-14", "ViT-H-14-quickgelu": "ViT-H-14"}  # fmt: skip
# text_cfg options that change the text tower's computation and have no CLIPTextModel equivalent
UNSUPPORTED_TEXT_OPTIONS = ("hf_model_name", "ls_init_value", "embed_cls", "no_causal_mask", "attn_pooler_heads",
                            "norm_kwargs", "act_kwargs", "final_ln_after_pool")  # fmt: skip
# module pairs (original open_clip module → CLIPTextModel module); parameters are then matched by their own names
TOP_MODULES = (("token_embedding", "embeddings.token_embedding"), ("ln_final", "final_layer_norm"))
BLOCK_MODULES = (("ln_1", "layer_norm1"), ("attn.out_proj", "self_attn.out_proj"), ("ln_2", "layer_norm2"),
                 ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"))  # fmt: skip
QKV = ("q_proj", "k_proj", "v_proj")  # nn.MultiheadAttention's in_proj rows, in this order
# the original's nn.MultiheadAttention computes through scaled_dot_product_attention: "sdpa" gives its numbers bit for
# bit on the fixture ("eager": within 1e-6)
ATTN_IMPLEMENTATION = "sdpa"


def known_arch_config(arch: str) -> dict | None:
    base = QUICK_GELU_ARCHS.get(arch, arch)
    if base not in KNOWN_ARCHS:
        return None
    embed_dim, width, heads, layers = KNOWN_ARCHS[base]
    text_cfg = dict(context_length=77, vocab_size=49408, width=width, heads=heads, layers=layers)
    return {"embed_dim": embed_dim, "quick_gelu": arch in QUICK_GELU_ARCHS, "text_cfg": text_cfg}


def resolve_arch(arch: str, search_dirs, open_clip_config=None, owner: str = "FrozenOpenCLIPEmbedder") -> dict:
    """The open_clip model config of ``arch``: ``open_clip_config`` (a JSON file, or a folder holding
    ``<arch>.json``), else ``open_clip_configs/<arch>.json`` in a search dir, else a published arch's numbers."""
    candidates = []
    if open_clip_config is not None:
        path = Path(open_clip_config)
        candidates.append(path / f"{arch}.json" if path.is_dir() else path)
    candidates += [Path(d) / "open_clip_configs" / f"{arch}.json" for d in search_dirs]
    for path in candidates:
        if path.is_file():
            try:
                config = json.loads(path.read_text())
            except ValueError as err:
                raise ValueError(f"{owner}: {path}: not a JSON open_clip model config ({err})") from None
            if not isinstance(config, dict) or not isinstance(config.get("text_cfg"), dict):
                raise ValueError(f"{path}: expected an open_clip model config with a 'text_cfg' mapping")
            return config
        if open_clip_config is not None and path == candidates[0]:
            raise FileNotFoundError(f"{owner}: --open-clip-config {open_clip_config}: no {path}")
    known = known_arch_config(arch)
    if known is None:
        raise ValueError(
            f"{owner}: unknown open_clip arch {arch!r} (its head count is not in the weights); known: "
            f"{', '.join(sorted([*KNOWN_ARCHS, *QUICK_GELU_ARCHS]))}; pass --open-clip-config PATH (an open_clip model "
            f"config JSON) or put open_clip_configs/{arch}.json beside the YAML"
        )
    return known


def text_config_from_arch(arch_config: Mapping, hidden_layers: int, version, owner: str):
    """The ``CLIPTextConfig`` of an open_clip text tower, run for ``hidden_layers`` blocks."""
    from transformers import CLIPTextConfig

    text = dict(arch_config["text_cfg"])
    bad = [k for k in UNSUPPORTED_TEXT_OPTIONS if text.get(k) not in (None, False)]
    if bad:
        raise ValueError(f"{owner}: open_clip text_cfg option(s) {', '.join(bad)} have no CLIPTextModel equivalent")
    quick = bool(arch_config.get("quick_gelu", False)) or str(version or "").lower() == "openai"
    width = int(text.get("width", 512))
    return CLIPTextConfig(
        vocab_size=int(text.get("vocab_size", 49408)),
        hidden_size=width,
        intermediate_size=int(width * float(text.get("mlp_ratio", 4.0))),
        num_hidden_layers=hidden_layers,
        num_attention_heads=int(text.get("heads", 8)),
        max_position_embeddings=int(text.get("context_length", 77)),
        hidden_act="quick_gelu" if quick else "gelu",
        layer_norm_eps=1e-5,  # open_clip's LayerNorm: torch's default
        projection_dim=int(arch_config.get("embed_dim", width)),
        bos_token_id=0, eos_token_id=2, pad_token_id=1,  # as diffusers' SD2 text_encoder/config.json
    )  # fmt: skip


def parameter_map(model, hidden_layers: int) -> dict[str, str]:
    """CLIPTextModel parameter name → original key, for every parameter but the split q/k/v projections."""
    root = model_root(model)
    names = {}
    pairs = [(f"model.{o}", root + h) for o, h in TOP_MODULES]
    for i in range(hidden_layers):
        pairs += [(f"{BLOCKS}{i}.{o}", f"{root}encoder.layers.{i}.{h}") for o, h in BLOCK_MODULES]
    for original, hf in pairs:
        for local, _ in model.get_submodule(hf).named_parameters(recurse=False):
            names[f"{hf}.{local}"] = f"{original}.{local}"
    names[f"{root}embeddings.position_embedding.weight"] = "model.positional_embedding"
    return names


def _block_count(state: Mapping) -> int:
    ids = {int(k[len(BLOCKS) :].split(".", 1)[0]) for k in state if k.startswith(BLOCKS)}
    if ids != set(range(len(ids))):
        raise ValueError(f"FrozenOpenCLIPEmbedder: resblocks {sorted(ids)} are not numbered 0..n-1")
    return len(ids)


class OpenCLIPCondStage(TextEncoderStage):
    target = TARGET
    owner = "FrozenOpenCLIPEmbedder"

    def __init__(self, params, text_encoder, tokenizer, kept):
        super().__init__(params, text_encoder, tokenizer, kept)

    @classmethod
    def layer_idx(cls, params: Mapping) -> int:
        layer = params.get("layer", "last")
        if layer not in LAYER_IDX:
            raise ValueError(f"{cls.owner}: layer={layer!r}: expected one of {', '.join(LAYER_IDX)}")
        return LAYER_IDX[layer]

    # --- building ----------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, params: Mapping, state, lookup) -> OpenCLIPCondStage:
        from transformers import CLIPTextModel

        layer_idx = cls.layer_idx(params)
        arch = params.get("arch", "ViT-H-14")
        arch_config = resolve_arch(arch, lookup.search_dirs, lookup.open_clip_config, cls.owner)
        layers = int(arch_config["text_cfg"].get("layers", 12))
        if state is not None and _block_count(state) != layers:
            raise ValueError(f"{cls.owner}: the weights have {_block_count(state)} resblocks, arch {arch!r} {layers}")
        if layers - layer_idx < 1:
            raise ValueError(
                f"{cls.owner}: arch {arch!r} has {layers} resblocks: too few for layer={params['layer']!r}"
            )
        tokenizer = open_clip_tokenizer(lookup.search_dirs, lookup.tokenizer_path, cls.owner)
        full = state if state is not None else cls._random_original_state(arch_config, params.get("version"))
        config = text_config_from_arch(arch_config, layers - layer_idx, params.get("version"), cls.owner)
        config._attn_implementation = ATTN_IMPLEMENTATION
        model = meta_init(lambda: CLIPTextModel(config), materialize=False)
        kept = cls._load(model, full, layers - layer_idx)
        return cls(params, model.eval(), tokenizer, kept)

    @classmethod
    def _random_original_state(cls, arch_config: Mapping, version) -> dict:
        """From scratch: the full original tower from a randomly initialised CLIPTextModel (all blocks), with
        ``text_projection`` and ``logit_scale`` initialised as open_clip does."""
        from transformers import CLIPTextModel

        layers = int(arch_config["text_cfg"].get("layers", 12))
        model = CLIPTextModel(text_config_from_arch(arch_config, layers, version, cls.owner))
        state = cls._to_original(model, layers)
        width, embed_dim = model.config.hidden_size, model.config.projection_dim
        state["model.text_projection"] = torch.nn.init.normal_(torch.empty(width, embed_dim), std=width**-0.5)
        state["model.logit_scale"] = torch.tensor(math.log(1 / 0.07), dtype=torch.float32)
        return state

    @classmethod
    def load(cls, folder: Path, params: Mapping, kept: Mapping) -> OpenCLIPCondStage:
        from transformers import CLIPTextModel, CLIPTokenizer

        cls.layer_idx(params)
        model = CLIPTextModel.from_pretrained(folder / "text_encoder", attn_implementation=ATTN_IMPLEMENTATION)
        set_buffer(model, model_root(model) + "embeddings.position_ids", _positions(model))
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        return cls(params, model.eval(), tokenizer, kept)

    @classmethod
    def _load(cls, model, state: Mapping, hidden_layers: int) -> dict:
        """Assign the original tensors into ``model``; returns those it does not hold (kept verbatim)."""
        names = parameter_map(model, hidden_layers)
        by_key = {key: name for name, key in names.items()}
        root = model_root(model)
        tensors, origin, used = {}, dict(names), set()
        for key, name in by_key.items():
            if key in state:
                tensors[name] = state[key]
                used.add(key)
        for i in range(hidden_layers):
            attn = f"{root}encoder.layers.{i}.self_attn"
            for kind in ("weight", "bias"):
                key = f"{BLOCKS}{i}.attn.in_proj_{kind}"
                if key not in state:
                    continue
                used.add(key)
                packed = state[key]
                if packed.shape[0] % 3:
                    raise ValueError(f"{cls.owner}: {key}: shape {tuple(packed.shape)}: expected 3 x width rows")
                for proj, part in zip(QKV, packed.chunk(3, dim=0), strict=True):
                    tensors[f"{attn}.{proj}.{kind}"] = part.clone()  # own storage: safetensors refuses shared views
                    origin[f"{attn}.{proj}.{kind}"] = key
        unused_in_path = [k for k in state if k not in used and k.startswith(BLOCKS)
                          and int(k[len(BLOCKS) :].split(".", 1)[0]) < hidden_layers]  # fmt: skip
        if unused_in_path:
            raise ValueError(f"{cls.owner}: {', '.join(unused_in_path[:4])}: no CLIPTextModel equivalent")
        assign_state(model, tensors, origin, cls.owner)
        set_buffer(model, root + "embeddings.position_ids", _positions(model))
        check_materialized(model, cls.owner)
        return {k: v for k, v in state.items() if k not in used}

    @classmethod
    def _to_original(cls, model, hidden_layers: int) -> dict:
        own = model.state_dict()
        state = {key: own[name] for name, key in parameter_map(model, hidden_layers).items()}
        root = model_root(model)
        for i in range(hidden_layers):
            attn = f"{root}encoder.layers.{i}.self_attn"
            for kind in ("weight", "bias"):
                state[f"{BLOCKS}{i}.attn.in_proj_{kind}"] = torch.cat([own[f"{attn}.{p}.{kind}"] for p in QKV])
        return state

    def component_state(self) -> dict:
        return self._to_original(self.text_encoder, self.text_encoder.config.num_hidden_layers)

    def _order_seed(self, state) -> list[str]:
        # open_clip's CLIP registers its transformer before token_embedding and ln_final
        return sorted(state, key=lambda key: not key.startswith(BLOCKS))

    # --- the original's forward -------------------------------------------------------------------------------------
    def tokenize(self, prompts) -> torch.Tensor:
        """``open_clip.tokenize(prompts)``: context 77 whatever ``max_length`` says (the original ignores it)."""
        if getattr(self, "_open_clip_tokenize", None) is None:
            self._open_clip_tokenize = OpenCLIPTokenize(self.tokenizer)
        return self._open_clip_tokenize(prompts)

    def encode(self, cond):
        tokens = self.tokenize(cond).to(self.device)
        return self.text_encoder(input_ids=tokens).last_hidden_state

    def unconditional(self, batch_size: int):
        return self.encode([""] * batch_size)


def _positions(model) -> torch.Tensor:
    return torch.arange(model.config.max_position_embeddings).expand((1, -1)).clone()
