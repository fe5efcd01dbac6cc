"""CompVis ``ldm.modules.encoders.modules.BERTEmbedder`` (txt2img-1p4B, text2img256, layout2img) as diffusers'
stock ``LDMBertModel`` (the ``bert`` of ``LDMTextToImagePipeline``) + a ``BertTokenizerFast``.

The original is an x-transformers ``TransformerWrapper(num_tokens=vocab_size, max_seq_len, attn_layers=Encoder(dim=
n_embed, depth=n_layer), emb_dropout=embedding_dropout)`` with the library's defaults: 8 heads of 64 (inner width 512
whatever ``n_embed`` is), q/k/v without bias, pre-norm ``LayerNorm``, feed-forward ``Linear(d, 4d)`` → GELU →
``Linear(4d, d)``, absolute learned positions, a final ``norm``; ``attn_layers.layers`` alternates [norm, attention,
residual] and [norm, feed-forward, residual]. ``encode(text)`` returns the final-norm embeddings (``to_logits`` is
carried but unused). ``LDMBertModel`` is that network; the key map below pairs the modules, and parameters follow by
their own names. Its tokenizer is ``BertTokenizerFast.from_pretrained("bert-base-uncased")`` (max_length
``max_seq_len``, padded, truncated); with ``use_tokenizer: false`` (layout2img) the input is already token ids.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .base import CondStage, assign_state, meta_init
from .tokenizers import BERT_FILES, BERT_HUB_IDS, BERT_VERSION, resolve_tokenizer_folder

TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
COMPONENT = "bert"
HEADS, DIM_HEAD, FF_MULT = 8, 64, 4  # x-transformers' defaults, which BERTEmbedder never overrides
# in the original's order: embeddings, the layers, then the final norm and to_logits
EMBEDDING_MODULES = (("transformer.token_emb", "model.embed_tokens"),
                     ("transformer.pos_emb.emb", "model.embed_positions"))  # fmt: skip
HEAD_MODULES = (("transformer.norm", "model.layer_norm"), ("transformer.to_logits", "to_logits"))
# layer i of LDMBert = original attn_layers.layers[2i] (attention) and [2i+1] (feed-forward)
ATTENTION_MODULES = (("0", "self_attn_layer_norm"), ("1.to_q", "self_attn.q_proj"), ("1.to_k", "self_attn.k_proj"),
                     ("1.to_v", "self_attn.v_proj"), ("1.to_out", "self_attn.out_proj"))  # fmt: skip
FEED_FORWARD_MODULES = (("0", "final_layer_norm"), ("1.net.0.0", "fc1"), ("1.net.2", "fc2"))


def bert_config(params: Mapping, owner: str):
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertConfig

    missing = [k for k in ("n_embed", "n_layer") if k not in params]
    if missing:
        raise ValueError(f"{owner}: cond_stage_config.params needs {', '.join(missing)}")
    if float(params.get("embedding_dropout", 0.0)) != 0.0:
        # LDMBert's one `dropout` also acts on every residual branch: it cannot express embedding-only dropout
        raise ValueError(f"{owner}: embedding_dropout={params['embedding_dropout']}: LDMBertModel has no equivalent")
    n_embed = int(params["n_embed"])
    return LDMBertConfig(
        vocab_size=int(params.get("vocab_size", 30522)),
        max_position_embeddings=int(params.get("max_seq_len", 77)),
        encoder_layers=int(params["n_layer"]),
        encoder_ffn_dim=FF_MULT * n_embed,
        encoder_attention_heads=HEADS,
        head_dim=DIM_HEAD,
        d_model=n_embed,
        activation_function="gelu",
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,  # the original has none
    )  # fmt: skip


def module_pairs(layers: int) -> list[tuple[str, str]]:
    """(original module, LDMBertModel module) for the whole network."""
    pairs = list(EMBEDDING_MODULES)
    for i in range(layers):
        pairs += [
            (f"transformer.attn_layers.layers.{2 * i}.{o}", f"model.layers.{i}.{h}") for o, h in ATTENTION_MODULES
        ]
        ff = FEED_FORWARD_MODULES
        pairs += [(f"transformer.attn_layers.layers.{2 * i + 1}.{o}", f"model.layers.{i}.{h}") for o, h in ff]
    return pairs + list(HEAD_MODULES)


def parameter_map(model) -> dict[str, str]:
    """LDMBertModel parameter name → original key."""
    names = {}
    for original, hf in module_pairs(model.config.encoder_layers):
        for local, _ in model.get_submodule(hf).named_parameters(recurse=False):
            names[f"{hf}.{local}"] = f"{original}.{local}"
    return names


def original_like_init(model) -> None:
    """From scratch, initialise as x-transformers does: PyTorch's default ``Linear`` init (LDMBert's own is
    normal(0.02)); embeddings normal(0.02) and LayerNorm ones/zeros are the same in both."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.reset_parameters()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)


class BERTCondStage(CondStage):
    target = TARGET
    owner = "BERTEmbedder"

    def __init__(self, params, bert, tokenizer):
        components = {COMPONENT: bert} if tokenizer is None else {COMPONENT: bert, "tokenizer": tokenizer}
        super().__init__(params, components, {})
        self.max_length = int(self.params.get("max_seq_len", 77))

    @property
    def bert(self):
        return self.components[COMPONENT]

    @property
    def use_tokenizer(self) -> bool:
        return bool(self.params.get("use_tokenizer", True))

    @classmethod
    def build(cls, params: Mapping, state, lookup) -> BERTCondStage:
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel

        config = bert_config(params, cls.owner)
        tokenizer = cls._tokenizer(params, lookup)
        model = meta_init(lambda: LDMBertModel(config), materialize=state is None)
        if state is None:
            original_like_init(model)
        else:
            names = parameter_map(model)
            by_key = {key: name for name, key in names.items()}
            unknown = [k for k in state if k not in by_key]
            if unknown:
                raise ValueError(f"{cls.owner}: unexpected key {unknown[0]}" + (" …" if len(unknown) > 1 else ""))
            assign_state(model, {by_key[k]: v for k, v in state.items()}, names, cls.owner)
        return cls(params, model.eval(), tokenizer)

    @classmethod
    def _tokenizer(cls, params: Mapping, lookup):
        if not params.get("use_tokenizer", True):
            return None
        from transformers import BertTokenizerFast

        folder = resolve_tokenizer_folder(cls.owner, BERT_VERSION, lookup.search_dirs, lookup.tokenizer_path,
                                          BERT_FILES, hub_ids=BERT_HUB_IDS[1:])  # fmt: skip
        return BertTokenizerFast.from_pretrained(folder)

    @classmethod
    def load(cls, folder: Path, params: Mapping, kept: Mapping) -> BERTCondStage:
        from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import LDMBertModel
        from transformers import BertTokenizerFast

        if kept:
            raise ValueError(f"{cls.owner}: unexpected kept tensors {', '.join(list(kept)[:4])}")
        model = LDMBertModel.from_pretrained(folder / COMPONENT)
        tokenizer = (
            BertTokenizerFast.from_pretrained(folder / "tokenizer") if params.get("use_tokenizer", True) else None
        )
        return cls(params, model.eval(), tokenizer)

    def component_state(self) -> dict:
        own = self.bert.state_dict()
        return {key: own[name] for name, key in parameter_map(self.bert).items()}

    def tokenize(self, prompts) -> torch.Tensor:
        if not self.use_tokenizer:
            return super().tokenize(prompts)
        batch = self.components["tokenizer"](prompts, truncation=True, max_length=self.max_length,
                                             padding="max_length", return_tensors="pt")  # fmt: skip
        return batch["input_ids"]

    def encode(self, cond) -> torch.Tensor:
        tokens = self.tokenize(cond) if self.use_tokenizer else torch.as_tensor(cond)
        return self.bert(input_ids=tokens.to(self.device), return_dict=True).last_hidden_state

    def unconditional(self, batch_size: int) -> torch.Tensor:
        if not self.use_tokenizer:
            raise NotImplementedError(f"{self.owner}: use_tokenizer is false: the original has no empty prompt")
        return self.encode([""] * batch_size)
