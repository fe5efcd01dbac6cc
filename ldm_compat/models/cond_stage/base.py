"""``CondStage``: one original cond-stage module as stock components, plus the tensors no component holds.

Every adapter maps the original module's state dict (``cond_stage_model.*`` with the prefix stripped) into its
components through their module trees and back; ``original_state_dict()`` gives every original key with its value and
dtype bit for bit (key order is the orchestrator's manifest).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

Tensor = torch.Tensor


def module_tree_order(keys) -> list[str]:
    """``keys`` in the order ``nn.Module.state_dict`` writes a module tree: at every module its own tensors first,
    then each child's subtree, children in order of first appearance. An order that already is a state dict's is
    unchanged; a key appended at the end (a buffer kept aside) goes back to its module."""
    tree: dict = {}
    for key in keys:
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"{key}: a tensor and a module share the name {part!r}")
        node[leaf] = key

    def walk(node: dict) -> list[str]:
        own = [v for v in node.values() if isinstance(v, str)]
        return own + [k for v in node.values() if isinstance(v, dict) for k in walk(v)]

    return walk(tree)


class UnsupportedCondStage(ValueError):
    """A ``cond_stage_config.target`` no adapter handles; the message names it and the supported ones."""


class CondStage:
    """A cond stage as stock components. Subclasses set ``target`` and implement the mapping and the forward.

    ``components``: folder subdir → object with ``save_pretrained``; ``kept``: original keys no component holds,
    verbatim; ``params``: the original ``cond_stage_config.params``.
    """

    target: str = ""

    def __init__(self, params: Mapping | None, components: dict[str, Any], kept: Mapping[str, Tensor]):
        self.params = dict(params or {})
        self.components = components
        self.kept = dict(kept)
        # the checkpoint's dtypes, recorded by the first .to(): export gives these back whatever encode ran in
        self.original_dtypes: dict[str, torch.dtype] | None = None

    # --- mapping ---------------------------------------------------------------------------------------------------
    def component_state(self) -> dict[str, Tensor]:
        """The original keys the components hold (prefix stripped), in the checkpoint's layout."""
        return {}

    def original_state_dict(self) -> dict[str, Tensor]:
        """Every original key (``cond_stage_model.`` stripped) with its original dtype; values bit-exact."""
        state = {}
        dtypes = self.original_dtypes or {}
        for key, value in self.component_state().items():
            state[key] = value.detach().to(device="cpu", dtype=dtypes.get(key, value.dtype))
        state.update({k: v.detach().cpu() for k, v in self.kept.items()})
        return {key: state[key] for key in module_tree_order(self._order_seed(state))}

    def _order_seed(self, state: Mapping[str, Tensor]) -> list[str]:
        """Keys in an order whose first appearances of each module follow the original module's registration
        (``module_tree_order`` then gives its ``state_dict`` order)."""
        return list(state)

    # --- the original's behaviour ---------------------------------------------------------------------------------
    def encode(self, cond):
        """``LatentDiffusion.get_learned_conditioning(cond)`` of the original."""
        raise NotImplementedError(f"{self.target}: encode is not available")

    def unconditional(self, batch_size: int):
        """The conditioning the original's guidance uses for "no condition" (``""`` / the null class)."""
        raise NotImplementedError(f"{self.target}: no unconditional conditioning")

    def tokenize(self, prompts) -> Tensor:
        raise NotImplementedError(f"{self.target}: takes no text, so it has no tokenizer")

    # --- utilities ---------------------------------------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {name: c for name, c in self.components.items() if isinstance(c, nn.Module)}

    def to(self, *args, **kwargs) -> CondStage:
        """Move/cast the components (``nn.Module.to`` arguments); ``original_state_dict`` keeps the original dtypes."""
        if self.original_dtypes is None:
            self.original_dtypes = {k: v.dtype for k, v in self.component_state().items()}
        for module in self.modules().values():
            module.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        for module in self.modules().values():
            for tensor in module.parameters():
                return tensor.device
        return torch.device("cpu")

    def save_pretrained(self, folder: str | Path, **kwargs) -> None:
        """Each component into ``folder/<subdir>`` (the orchestrator may do this itself)."""
        for name, component in self.components.items():
            component.save_pretrained(Path(folder) / name, **kwargs)

    def __repr__(self) -> str:
        parts = ", ".join(f"{k}={type(v).__name__}" for k, v in self.components.items())
        return f"{type(self).__name__}(target={self.target!r}, components={{{parts}}}, kept={len(self.kept)} tensors)"


class TextEncoderStage(CondStage):
    """A cond stage held as ``text_encoder`` + ``tokenizer`` (CLIP, OpenCLIP): frozen unless ``freeze: false``."""

    def __init__(self, params: Mapping | None, text_encoder: nn.Module, tokenizer, kept: Mapping[str, Tensor]):
        super().__init__(params, {"text_encoder": text_encoder, "tokenizer": tokenizer}, kept)
        if self.params.get("freeze", True):
            text_encoder.eval().requires_grad_(False)

    @property
    def text_encoder(self):
        return self.components["text_encoder"]

    @property
    def tokenizer(self):
        return self.components["tokenizer"]


# --- loading tensors through a module tree -----------------------------------------------------------------------


def meta_init(factory: Callable[[], nn.Module], materialize: bool) -> nn.Module:
    """Build ``factory()`` on the meta device (no random init, no memory) when its weights come from a checkpoint."""
    if not materialize:
        with torch.device("meta"):
            return factory()
    return factory()


def assign_state(module: nn.Module, tensors: Mapping[str, Tensor], origin: Mapping[str, str], owner: str) -> None:
    """Load ``tensors`` (module-relative names) into ``module`` as its own tensors (dtype and storage kept).

    ``origin`` maps each module name to the original key it came from, so an error names the key the user has.
    Every persistent tensor of ``module`` must be given, with its shape."""
    expected = module.state_dict(keep_vars=True)
    missing = [name for name in expected if name not in tensors]
    unexpected = [name for name in tensors if name not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(
                f"missing {', '.join(origin.get(n, n) for n in missing[:6])}{' …' if len(missing) > 6 else ''}"
            )
        if unexpected:
            parts.append(f"unexpected {', '.join(origin.get(n, n) for n in unexpected[:6])}")
        raise ValueError(f"{owner}: the weights do not fit the config: {'; '.join(parts)}")
    for name, value in tensors.items():
        if tuple(value.shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{owner}: {origin.get(name, name)}: shape {tuple(value.shape)}, the config expects "
                f"{tuple(expected[name].shape)}"
            )
    module.load_state_dict(dict(tensors), strict=True, assign=True)


def check_materialized(module: nn.Module, owner: str) -> None:
    """After a meta build: no tensor may be left on the meta device (a non-persistent buffer nobody filled)."""
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{owner}: tensors left without values after loading: {', '.join(left[:6])}")


def set_buffer(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace the (possibly meta, non-persistent) buffer ``name`` of ``module`` by ``value``."""
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    persistent = leaf not in owner._non_persistent_buffers_set
    owner.register_buffer(leaf, value, persistent=persistent)
