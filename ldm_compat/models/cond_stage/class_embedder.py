"""``ldm.modules.encoders.modules.ClassEmbedder`` as ``ClassEmbedderModel``, a small diffusers ``ModelMixin``.

Both codebases name the class the same. CompVis/latent-diffusion: ``ClassEmbedder(embed_dim, n_classes=1000,
key='class')`` embeds ``batch[key][:, None]`` (b x 1 x d, the cross-attention context). The Stability-AI fork adds
``ucg_rate=0.1``: forward replaces each label by the null class ``n_classes - 1`` with that probability, and
``get_unconditional_conditioning`` gives the null class. A YAML cannot tell the two apart, so ``ucg_rate`` is 0 (the
CompVis class, every published cin config) unless the config sets it.

Original bugs (SD2 fork), fixed by default, reproduced with ``ldm_bug_compat=True``:
- the label dropout runs whenever ``ucg_rate > 0``, in eval mode too, so sampling drops ~10% of the conditional
  labels to the null class; by default it runs only in training mode;
- ``get_unconditional_conditioning`` builds float labels that only the dropout branch casts back to long, so with
  ``ucg_rate=0`` the original fails in ``nn.Embedding``; ``unconditional`` here always embeds integer labels.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from .base import CondStage, assign_state

TARGET = "ldm.modules.encoders.modules.ClassEmbedder"
COMPONENT = "class_embedder"


class ClassEmbedderModel(ModelMixin, ConfigMixin):
    """An ``nn.Embedding`` of class labels into a one-token cross-attention context (b x 1 x ``embed_dim``).

    State-dict key as the original: ``embedding.weight``. ``null_class`` (= ``n_classes - 1``) is the label of the
    unconditional branch, as the original's guidance uses it (the cin256-v2 sampling notebook: class 1000 of 1001).
    """

    @register_to_config
    def __init__(
        self,
        embed_dim: int,
        n_classes: int = 1000,
        key: str = "class",
        ucg_rate: float = 0.0,
        ldm_bug_compat: bool = False,
    ):
        super().__init__()
        if not 0.0 <= float(ucg_rate) <= 1.0:
            raise ValueError(f"ClassEmbedderModel: ucg_rate={ucg_rate!r}: expected a probability in [0, 1]")
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def null_class(self) -> int:
        return self.config.n_classes - 1

    def forward(self, labels: torch.Tensor, disable_dropout: bool = False) -> torch.Tensor:
        """Labels (b,) → context (b, 1, embed_dim); with ``ucg_rate`` > 0 (training mode) labels drop to the null
        class with that probability, drawn as the original does (``torch.bernoulli`` on a b x 1 tensor)."""
        c = labels[:, None]
        dropout = self.config.ucg_rate > 0.0 and not disable_dropout
        if dropout and (self.training or self.config.ldm_bug_compat):
            mask = 1.0 - torch.bernoulli(torch.ones_like(c) * self.config.ucg_rate)
            c = (mask * c + (1 - mask) * torch.ones_like(c) * self.null_class).long()
        return self.embedding(c.long())

    def unconditional_labels(self, batch_size: int) -> torch.Tensor:
        return torch.full((batch_size,), self.null_class, dtype=torch.long, device=self.embedding.weight.device)


class ClassEmbedderCondStage(CondStage):
    target = TARGET
    owner = "ClassEmbedder"

    def __init__(self, params, model: ClassEmbedderModel):
        super().__init__(params, {COMPONENT: model}, {})

    @property
    def model(self) -> ClassEmbedderModel:
        return self.components[COMPONENT]

    @classmethod
    def build(cls, params: Mapping, state, lookup=None) -> ClassEmbedderCondStage:
        if "embed_dim" not in params:
            raise ValueError(f"{cls.owner}: cond_stage_config.params needs embed_dim")
        model = ClassEmbedderModel(
            embed_dim=int(params["embed_dim"]),
            n_classes=int(params.get("n_classes", 1000)),
            key=str(params.get("key", "class")),
            ucg_rate=float(params.get("ucg_rate", 0.0)),
            ldm_bug_compat=bool(params.get("ldm_bug_compat", False)),
        )
        if state is not None:
            assign_state(model, state, {}, cls.owner)
        return cls(params, model.eval())

    @classmethod
    def load(cls, folder, params: Mapping, kept: Mapping) -> ClassEmbedderCondStage:
        if kept:
            raise ValueError(f"{cls.owner}: unexpected kept tensors {', '.join(list(kept)[:4])}")
        return cls(params, ClassEmbedderModel.from_pretrained(folder / COMPONENT).eval())

    def component_state(self) -> dict:
        return dict(self.model.state_dict())

    def labels_of(self, cond) -> torch.Tensor:
        """The original reads ``batch[key]``; a label tensor (or list of ints) is taken as that value directly."""
        if isinstance(cond, Mapping):
            if self.model.config.key not in cond:
                raise KeyError(f"{self.owner}: the batch has no {self.model.config.key!r} (the config's key)")
            cond = cond[self.model.config.key]
        return torch.as_tensor(cond, device=self.device)

    def encode(self, cond) -> torch.Tensor:
        return self.model(self.labels_of(cond))

    def unconditional(self, batch_size: int) -> torch.Tensor:
        return self.model(self.model.unconditional_labels(batch_size))
