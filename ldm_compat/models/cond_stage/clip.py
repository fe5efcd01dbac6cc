"""``ldm.modules.encoders.modules.FrozenCLIPEmbedder`` (SD1; the SD2 fork adds ``layer``/``layer_idx``) as a stock
transformers ``CLIPTextModel`` + ``CLIPTokenizer``.

The original holds a ``CLIPTextModel`` under ``transformer``, so its keys are transformers' own names under whatever
layout the transformers of the day had: ``transformer.text_model.*`` with a persistent ``embeddings.position_ids``
(4.19 … 4.30, every SD1 checkpoint), ``transformer.text_model.*`` without it (4.31 … 5.5), or flat ``transformer.*``
(5.6+). We resolve each key in the installed ``CLIPTextModel``'s own module tree (its root is ``text_model`` when it
has one), remember which layout the checkpoint used, and keep ``position_ids`` verbatim for export (its values also
fill the model's buffer, as the original's ``load_state_dict`` copied them into its int64 buffer).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from .base import TextEncoderStage, assign_state, check_materialized, meta_init, set_buffer
from .tokenizers import CLIP_FILES, find_pretrained_folder, ftfy_fix, resolve_tokenizer_folder

TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
DEFAULT_VERSION = "openai/clip-vit-large-patch14"
LAYERS = ("last", "pooled", "hidden")
NESTED_ROOT = "transformer.text_model."  # transformers < 5.6, as every published checkpoint has it
FLAT_ROOT = "transformer."
LAYOUT_ATTR = "ldm_state_dict_prefix"  # recorded in the text encoder's config.json so export restores the layout
ATTN_IMPLEMENTATION = "eager"  # the original's transformers computed attention this way: bit-exact (sdpa: ~5e-7)

# text towers of published CLIP versions (facts from their config.json), used when no local config is found
KNOWN_TEXT_CONFIGS = {
    "openai/clip-vit-large-patch14": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, projection_dim=768),
    "openai/clip-vit-large-patch14-336": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                              num_attention_heads=12, projection_dim=768),
    "openai/clip-vit-base-patch32": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                         num_attention_heads=8, projection_dim=512),
    "openai/clip-vit-base-patch16": dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                                         num_attention_heads=8, projection_dim=512),
}  # fmt: skip
_OPENAI_COMMON = dict(vocab_size=49408, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                      bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip


def _check_layer(params: Mapping, owner: str) -> tuple[str, int | None]:
    layer, layer_idx = params.get("layer", "last"), params.get("layer_idx")
    if layer not in LAYERS:
        raise ValueError(f"{owner}: layer={layer!r}: expected one of {', '.join(LAYERS)}")
    if layer == "hidden" and (layer_idx is None or not 0 <= abs(int(layer_idx)) <= 12):
        raise ValueError(f"{owner}: layer='hidden' needs layer_idx with 0 <= abs(layer_idx) <= 12, got {layer_idx!r}")
    return layer, layer_idx


def model_root(model) -> str:
    """Where the text transformer sits in this transformers' ``CLIPTextModel``: ``text_model.`` or the top."""
    return "text_model." if hasattr(model, "text_model") else ""


def text_config(version: str, search_dirs, tokenizer_dir: Path | None, owner: str):
    """The ``CLIPTextConfig`` the original's ``CLIPTextModel.from_pretrained(version)`` used (head count, activation
    are not in the weights): the version's folder, the tokenizer folder, or a published version's known numbers."""
    from transformers import CLIPTextConfig

    folders = []
    found = find_pretrained_folder(version, search_dirs, ("config.json",))
    if found is not None:
        folders.append(found)
    if tokenizer_dir is not None:
        folders += [tokenizer_dir, tokenizer_dir.parent / "text_encoder"]
    for folder in folders:
        if (folder / "config.json").is_file():
            return CLIPTextConfig.from_pretrained(folder)
    if version in KNOWN_TEXT_CONFIGS:
        return CLIPTextConfig(**_OPENAI_COMMON, **KNOWN_TEXT_CONFIGS[version])
    raise FileNotFoundError(
        f"{owner}: no config.json for version {version!r} (the head count is not in the weights); put the version's "
        f"folder beside the YAML or pass --tokenizer PATH to a folder with config.json"
    )


def _has_weights(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin"))


class CLIPCondStage(TextEncoderStage):
    target = TARGET
    owner = "FrozenCLIPEmbedder"

    def __init__(self, params, text_encoder, tokenizer, kept, original_root: str):
        self.original_root = original_root
        self.layer, self.layer_idx = _check_layer(params or {}, self.owner)
        self.max_length = int((params or {}).get("max_length", 77))
        super().__init__(params, text_encoder, tokenizer, kept)

    # --- building ----------------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, params: Mapping, state, lookup) -> CLIPCondStage:
        from transformers import CLIPTextModel, CLIPTokenizer

        _check_layer(params, cls.owner)
        version = params.get("version", DEFAULT_VERSION)
        tok_dir = resolve_tokenizer_folder(cls.owner, version, lookup.search_dirs, lookup.tokenizer_path, CLIP_FILES)
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        config = text_config(version, lookup.search_dirs, tok_dir, cls.owner)
        config._attn_implementation = ATTN_IMPLEMENTATION
        if state is None:  # from scratch: the original's from_pretrained(version) weights when they are local
            weights = find_pretrained_folder(version, lookup.search_dirs, ("config.json",))
            if weights is not None and _has_weights(weights):
                model = CLIPTextModel.from_pretrained(weights, attn_implementation=ATTN_IMPLEMENTATION)
            else:
                model = CLIPTextModel(config)
            # export in the layout of the transformers the original pins (4.19): nested, with position_ids
            setattr(model.config, LAYOUT_ATTR, NESTED_ROOT)
            root = model_root(model)
            kept = {NESTED_ROOT + name[len(root) :]: buffer.clone() for name, buffer in model.named_buffers()}
            return cls(params, model.eval(), tokenizer, kept, NESTED_ROOT)
        original_root = NESTED_ROOT if any(k.startswith(NESTED_ROOT) for k in state) else FLAT_ROOT
        model = meta_init(lambda: CLIPTextModel(config), materialize=False)
        kept = cls._load(model, state, original_root)
        setattr(model.config, LAYOUT_ATTR, original_root)
        return cls(params, model.eval(), tokenizer, kept, original_root)

    @classmethod
    def load(cls, folder: Path, params: Mapping, kept: Mapping) -> CLIPCondStage:
        from transformers import CLIPTextModel, CLIPTokenizer

        model = CLIPTextModel.from_pretrained(folder / "text_encoder", attn_implementation=ATTN_IMPLEMENTATION)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        original_root = getattr(model.config, LAYOUT_ATTR, NESTED_ROOT)
        cls._fill_buffers(model, kept, original_root)
        return cls(params, model.eval(), tokenizer, kept, original_root)

    @classmethod
    def _load(cls, model, state: Mapping, original_root: str) -> dict:
        """Assign the checkpoint's tensors into ``model``; returns the ones it does not persist (kept verbatim)."""
        root = model_root(model)
        persistent = model.state_dict(keep_vars=True)
        buffers = dict(model.named_buffers())
        tensors, kept = {}, {}
        for key, value in state.items():
            if not key.startswith(original_root):
                raise ValueError(f"{cls.owner}: unexpected key {key} (expected {original_root}*)")
            name = root + key[len(original_root) :]
            if name in persistent:
                tensors[name] = value
            elif name in buffers:
                kept[key] = value  # position_ids: not saved by this transformers, so it travels verbatim
            else:
                raise ValueError(f"{cls.owner}: unexpected key {key}: the CLIPTextModel has no {name}")
        assign_state(model, tensors, {n: original_root + n[len(root) :] for n in persistent}, cls.owner)
        cls._fill_buffers(model, kept, original_root)
        return kept

    @classmethod
    def _fill_buffers(cls, model, kept: Mapping, original_root: str) -> None:
        """Non-persistent buffers: the checkpoint's values when it carried them (as the original's int64 copy_),
        else what the model computes by itself."""
        root = model_root(model)
        for name, buffer in list(model.named_buffers()):
            key = original_root + name[len(root) :]
            if key in kept:
                value = kept[key]
                if tuple(value.shape) != tuple(buffer.shape):
                    raise ValueError(f"{cls.owner}: {key}: shape {tuple(value.shape)}, expected {tuple(buffer.shape)}")
                set_buffer(model, name, value.detach().to(dtype=buffer.dtype, device="cpu").clone())
            elif buffer.is_meta and name.endswith("position_ids"):
                set_buffer(model, name, torch.arange(buffer.shape[-1]).expand(buffer.shape).clone())
        check_materialized(model, cls.owner)

    def component_state(self) -> dict:
        root = model_root(self.text_encoder)
        return {self.original_root + k[len(root) :]: v for k, v in self.text_encoder.state_dict().items()}

    # --- the original's forward -------------------------------------------------------------------------------------
    def tokenize(self, prompts) -> torch.Tensor:
        """The original's tokenizer call; its (slow) CLIPTokenizer ran ``ftfy.fix_text`` first, as we do when ftfy
        is installed (the stock fast tokenizer does not)."""
        prompts = [ftfy_fix(prompts)] if isinstance(prompts, str) else [ftfy_fix(p) for p in prompts]
        batch = self.tokenizer(prompts, truncation=True, max_length=self.max_length, padding="max_length",
                               return_tensors="pt")  # fmt: skip
        return batch["input_ids"]

    def encode(self, cond):
        tokens = self.tokenize(cond).to(self.device)
        out = self.text_encoder(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]

    def unconditional(self, batch_size: int):
        return self.encode([""] * batch_size)
