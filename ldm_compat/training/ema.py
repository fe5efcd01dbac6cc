"""``LitEmaModel``: the original latent-diffusion ``LitEma`` (``ldm/modules/ema.py``) on diffusers' ``EMAModel``.

What is reproduced exactly (bit for bit with the default ``update="exact"``):

- the decay: the float32 ``decay`` buffer, capped by ``(1 + n) / (10 + n)`` computed in float32 from the int32
  counter ``n`` *after* it is incremented (diffusers' ``EMAModel`` default is one step behind: its first update copies);
  ``use_num_updates=False`` (the original's ``use_num_upates``, sic) keeps ``n = -1`` and the decay constant;
- the update ``shadow -= (1 - decay) * (shadow - param)`` with LitEma's float32 roundings, fused over all parameters
  (``torch._foreach_*`` calls per chunk of parameters, no per-parameter Python loop; see ``ema_update``);
- which parameters are tracked: those with ``requires_grad`` when the EMA is built (frozen ones get no shadow and are
  left alone by ``copy_to``), in ``named_parameters()`` order;
- the original buffer names, ``model_ema.<parameter name with dots removed>`` plus ``model_ema.decay`` (float32, 0-d)
  and ``model_ema.num_updates`` (int32, 0-d), through ``to_original_state_dict`` / ``load_original_state_dict``.

What is fixed (each documented where it happens): shadows stay float32 for a bf16/fp16 model (the original silently
stopped updating, ``ldm_bug_compat=True`` reproduces that); parameters frozen or unfrozen after construction are
skipped instead of raising ``AssertionError``/``KeyError``; ``load_state_dict`` copies into the existing shadows so a
checkpoint loaded on the CPU does not move a GPU EMA to the CPU.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import torch
from diffusers.training_utils import EMAModel
from torch import nn

from ldm_compat.training.ema_sharded import local_pairs, local_tensors
from ldm_compat.training.ema_update import FusedEmaUpdate, as_float32, litema_decay, one_minus_float32

logger = logging.getLogger(__name__)

UPDATE_METHODS = ("exact", "lerp")
# keys of ``state_dict()`` that EMAModel does not have
_OWN_STATE_KEYS = ("use_num_updates", "ldm_bug_compat", "update", "tracked_names")


class OriginalEmaLoadResult(NamedTuple):
    """What ``load_original_state_dict`` did not match (full original key names)."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _short_list(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return f"[{shown}{f', ... and {len(keys) - limit} more' if len(keys) > limit else ''}]"


class LitEmaModel(EMAModel):
    """An ``EMAModel`` that reproduces the original ``LitEma`` exactly.

    Args:
        model_or_parameters: the ``nn.Module`` to track (recommended: its parameter names give the original buffer
            names), or an iterable of parameters. Only parameters with ``requires_grad`` are tracked, as in LitEma.
        decay: the original ``decay`` (default 0.9999); stored rounded to float32 like LitEma's buffer.
        use_num_updates: the original ``use_num_upates`` (sic; that spelling is accepted too). ``True``: the decay
            warms up as ``min(decay, (1 + n) / (10 + n))``; ``False``: constant decay (``num_updates == -1``).
        update: ``"exact"`` (default) reproduces LitEma's float32 roundings bit for bit; ``"lerp"`` uses one
            ``torch._foreach_lerp_`` (about 3x less memory traffic, fastest on CPU) whose fused multiply-add differs
            from LitEma by up to one float32 ulp per update.
        ldm_bug_compat: reproduce the original's dtype bug: shadows take the parameter's dtype at construction and
            a parameter whose dtype differs from its shadow's at update time is not averaged (LitEma's ``type_as``
            made a new tensor and updated that). Default ``False``: shadows are at least float32 and always updated.
        model_cls, model_config: as in ``EMAModel``, for ``save_pretrained`` / ``from_pretrained``.
        foreach: accepted for ``EMAModel`` compatibility; the update is always fused.

    The counter is ``num_updates`` (LitEma's name); ``optimization_step`` (EMAModel's) is the same number, and
    ``update_after_step`` is fixed at -1, which is how EMAModel's ``step - update_after_step - 1`` equals LitEma's
    counter. So ``state_dict()`` also loads into a plain ``EMAModel`` tracking the same parameters.
    """

    def __init__(
        self,
        model_or_parameters: nn.Module | Iterable[torch.Tensor],
        decay: float = 0.9999,
        use_num_updates: bool = True,
        *,
        update: str = "exact",
        ldm_bug_compat: bool = False,
        model_cls: Any | None = None,
        model_config: dict[str, Any] | None = None,
        foreach: bool = True,
        **kwargs,
    ):
        if "use_num_upates" in kwargs:  # the original's spelling
            use_num_updates = kwargs.pop("use_num_upates")
        if kwargs:
            raise ValueError(
                f"LitEmaModel: unsupported option(s) {sorted(kwargs)}; it follows LitEma's schedule, set by decay and "
                "use_num_updates only"
            )
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"LitEmaModel: decay={decay!r}, expected a value between 0 and 1")
        if update not in UPDATE_METHODS:
            raise ValueError(f"LitEmaModel: update={update!r}, expected one of {UPDATE_METHODS}")
        super().__init__(
            [], decay=as_float32(decay), min_decay=0.0, update_after_step=-1, foreach=True,
            model_cls=model_cls, model_config=model_config,
        )  # fmt: skip
        self.use_num_updates = bool(use_num_updates)
        self.update = update
        self.ldm_bug_compat = bool(ldm_bug_compat)
        self.chunk_elements: int | None = None  # None: the per-device default of ema_update; a speed knob only
        self._fused_update = FusedEmaUpdate()
        self._track(model_or_parameters)
        self.num_updates = 0 if self.use_num_updates else -1

    # ------------------------------------------------------------------ tracking

    def _make_shadow(self, param: torch.Tensor) -> torch.Tensor:
        shadow = param.detach().clone()
        if not self.ldm_bug_compat and shadow.is_floating_point():
            # keep at least float32 so a bf16/fp16 model is still averaged in float32
            shadow = shadow.to(torch.promote_types(shadow.dtype, torch.float32))
        return shadow

    def _track(self, model_or_parameters) -> None:
        """(Re)build the shadows from the ``requires_grad`` parameters, remembering their names and positions."""
        if isinstance(model_or_parameters, nn.Module):
            named = list(model_or_parameters.named_parameters())
        else:
            params = list(model_or_parameters)
            if not all(isinstance(p, torch.Tensor) for p in params):
                raise ValueError("LitEmaModel: expected an nn.Module or an iterable of tensors (parameters)")
            named = [(None, p) for p in params]
        picked = [(i, name, p) for i, (name, p) in enumerate(named) if p.requires_grad]
        self._num_params = len(named)
        self._index = [i for i, _, _ in picked]
        self._names = [name for _, name, _ in picked] if isinstance(model_or_parameters, nn.Module) else None
        with torch.no_grad():
            self.shadow_params = [self._make_shadow(p) for _, _, p in picked]
        self.temp_stored_params = None
        self._fused_update.clear()

    def _resolve(self, model_or_parameters) -> list[torch.Tensor]:
        """The live parameters that correspond, one to one, to ``shadow_params``."""
        if isinstance(model_or_parameters, nn.Module):
            if self._names is not None:
                named = dict(model_or_parameters.named_parameters())
                try:
                    return [named[name] for name in self._names]
                except KeyError as err:
                    raise ValueError(
                        f"LitEmaModel: the model has no parameter {err.args[0]!r} that is tracked"
                    ) from None
            model_or_parameters = model_or_parameters.parameters()
        params = list(model_or_parameters)
        if len(params) == self._num_params:
            return [params[i] for i in self._index]
        if len(params) == len(self.shadow_params):
            return params
        raise ValueError(
            f"LitEmaModel: got {len(params)} parameters, expected all {self._num_params} of the model or the "
            f"{len(self.shadow_params)} tracked ones"
        )

    def _names_for(self, model: nn.Module | None) -> list[str]:
        """Parameter names of the shadows, taken from ``model.named_parameters()`` (never from buffer names)."""
        if model is None:
            if self._names is None:
                raise ValueError("LitEmaModel: built from a parameter list, so pass the model to map names")
            return self._names
        named = [name for name, _ in model.named_parameters()]
        if self._names is not None:
            missing = sorted(set(self._names) - set(named))
            if missing:
                raise ValueError(f"LitEmaModel: the model lacks tracked parameter(s) {_short_list(missing)}")
            return self._names
        if len(named) != self._num_params:
            raise ValueError(
                f"LitEmaModel: the model has {len(named)} parameters, the EMA was built on {self._num_params}"
            )
        return [named[i] for i in self._index]

    @property
    def optimization_step(self) -> int:
        """EMAModel's counter; the same number as LitEma's ``num_updates`` (``update_after_step`` is -1)."""
        return self.num_updates

    @optimization_step.setter
    def optimization_step(self, value: int) -> None:
        self.num_updates = value

    # ------------------------------------------------------------------ the update

    def get_decay(self, optimization_step: int) -> float:
        """LitEma's decay at counter value ``optimization_step`` (see ``litema_decay``)."""
        return litema_decay(self.decay, optimization_step)

    @torch.no_grad()
    def step(self, model_or_parameters: nn.Module | Iterable[torch.Tensor]) -> None:
        """One EMA update: the original ``LitEma.forward(model)``.

        Parameters frozen since construction are skipped (the original raised ``AssertionError``); parameters
        unfrozen since construction have no shadow and are ignored (the original raised ``KeyError``).
        """
        params = self._resolve(model_or_parameters)
        shadows = self.shadow_params
        if self.num_updates >= 0:
            self.num_updates += 1
        decay = self.get_decay(self.num_updates)
        self.cur_decay_value = decay
        one_minus_decay = one_minus_float32(decay)

        if self.ldm_bug_compat:
            keep = [i for i, (s, p) in enumerate(zip(shadows, params)) if p.requires_grad and p.dtype == s.dtype]
        else:
            keep = [i for i, p in enumerate(params) if p.requires_grad]
        if len(keep) != len(params):
            shadows, params = [shadows[i] for i in keep], [params[i] for i in keep]
        if not shadows:
            return
        shadows, params = local_pairs(shadows, params)  # FSDP2: each process averages its own shards
        if shadows[0].device != params[0].device:
            raise ValueError(
                f"LitEmaModel: shadows are on {shadows[0].device}, parameters on {params[0].device}; call .to(device)"
            )
        self._fused_update(shadows, params, one_minus_decay, self.update, self.chunk_elements)

    def __call__(self, model: nn.Module) -> None:
        """``ema(model)``, as the original ``LitEma`` module was called."""
        self.step(model)

    # ------------------------------------------------------------------ using the averages

    @torch.no_grad()
    def copy_to(self, model_or_parameters: nn.Module | Iterable[torch.Tensor]) -> None:
        """Write the averages into the tracked parameters (LitEma ``copy_to``); untracked ones are left alone."""
        params = self._resolve(model_or_parameters)
        if params:
            shadows, params = local_pairs(self.shadow_params, [p.data for p in params])
            torch._foreach_copy_(params, shadows)

    @torch.no_grad()
    def store(self, parameters: nn.Module | Iterable[torch.Tensor]) -> None:
        """Keep a copy of *all* parameters (frozen ones too, as LitEma) on their own device, for ``restore``."""
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        self.temp_stored_params = [p.detach().clone() for p in parameters]

    @torch.no_grad()
    def restore(self, parameters: nn.Module | Iterable[torch.Tensor]) -> None:
        """Put back what ``store`` kept, then forget it (EMAModel semantics)."""
        if self.temp_stored_params is None:
            raise RuntimeError("This ExponentialMovingAverage has no `store()`ed weights to `restore()`")
        if isinstance(parameters, nn.Module):
            parameters = parameters.parameters()
        params = list(parameters)
        if len(params) != len(self.temp_stored_params):
            raise ValueError(
                f"LitEmaModel.restore: got {len(params)} parameters, stored {len(self.temp_stored_params)}"
            )
        if params:
            torch._foreach_copy_(local_tensors([p.data for p in params]), local_tensors(self.temp_stored_params))
        self.temp_stored_params = None

    @contextlib.contextmanager
    def ema_scope(self, model: nn.Module, context: str | None = None) -> Iterator[nn.Module]:
        """The original ``DDPM.ema_scope``: the model holds the EMA weights inside the block, its own ones after."""
        self.store(model)
        self.copy_to(model)
        if context is not None:
            logger.info("%s: Switched to EMA weights", context)
        try:
            yield model
        finally:
            self.restore(model)
            if context is not None:
                logger.info("%s: Restored training weights", context)

    # ------------------------------------------------------------------ resets (stablediffusion)

    def reset_num_updates(self) -> None:
        """SD2 ``reset_num_ema_updates``: ``num_updates = 0``, so the warm-up restarts (even after
        ``use_num_updates=False``, as in the original)."""
        self.num_updates = 0

    reset_num_ema_updates = reset_num_updates

    def reset_to(self, model: nn.Module) -> None:
        """SD2 ``reset_ema``: start over from ``model``'s current weights (a fresh LitEma: shadows, tracked set and
        counter), e.g. after loading a checkpoint that has no EMA."""
        self._track(model)
        self.num_updates = 0 if self.use_num_updates else -1

    reset_ema = reset_to

    # ------------------------------------------------------------------ diffusers state

    def state_dict(self) -> dict:
        """EMAModel's state (``optimization_step`` is ``num_updates``) plus this class's options and tracked names.

        Works with ``accelerator.register_for_checkpointing``; like ``nn.Module.state_dict`` the shadows are
        references, not copies.
        """
        state = super().state_dict()
        state.update(
            use_num_updates=self.use_num_updates, ldm_bug_compat=self.ldm_bug_compat, update=self.update,
            tracked_names=None if self._names is None else list(self._names),
        )  # fmt: skip
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Inverse of ``state_dict``; the shadows are copied into the existing tensors (device and dtype kept)."""
        state = dict(state_dict)
        shadows = state.pop("shadow_params", None)
        own = {key: state.pop(key) for key in _OWN_STATE_KEYS if key in state}
        for key, expected in (("update_after_step", -1), ("use_ema_warmup", False), ("min_decay", 0.0)):
            if key in state and state[key] != expected:
                raise ValueError(f"LitEmaModel.load_state_dict: {key}={state[key]!r}, a LitEma state has {expected!r}")
        names = own.get("tracked_names")
        if names is not None and self._names is not None and list(names) != self._names:
            raise ValueError("LitEmaModel.load_state_dict: tracked_names differ from this EMA's parameters")
        if shadows is not None:
            if not isinstance(shadows, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in shadows):
                raise ValueError("LitEmaModel.load_state_dict: shadow_params must be a list of tensors")
            if len(shadows) != len(self.shadow_params):
                raise ValueError(
                    f"LitEmaModel.load_state_dict: {len(shadows)} shadow_params, expected {len(self.shadow_params)}"
                )
            for i, (mine, theirs) in enumerate(zip(self.shadow_params, shadows)):
                if mine.shape != theirs.shape:
                    raise ValueError(
                        f"LitEmaModel.load_state_dict: shadow_params[{i}] has shape {tuple(theirs.shape)}, "
                        f"expected {tuple(mine.shape)}"
                    )
        super().load_state_dict(state)  # validates and sets decay, optimization_step (= num_updates), ...
        self.decay = as_float32(self.decay)
        if "use_num_updates" in own:
            self.use_num_updates = bool(own["use_num_updates"])
        if "ldm_bug_compat" in own:
            self.ldm_bug_compat = bool(own["ldm_bug_compat"])
        if "update" in own:
            if own["update"] not in UPDATE_METHODS:
                raise ValueError(f"LitEmaModel.load_state_dict: update={own['update']!r}, expected {UPDATE_METHODS}")
            self.update = own["update"]
        if shadows:
            with torch.no_grad():
                torch._foreach_copy_(self.shadow_params, list(shadows))

    def save_pretrained(self, path, model: nn.Module | None = None) -> None:
        """Save the averaged weights as a ``model_cls`` folder (EMAModel convention: EMA state in its config.json).

        Parameters that are not tracked (frozen at construction) are not averaged; their value comes from
        ``model`` when given. Without ``model`` a fresh ``model_cls`` would supply random values for them, so that
        case raises.
        """
        if self.model_cls is None or self.model_config is None:
            raise ValueError("LitEmaModel.save_pretrained: needs model_cls and model_config at construction")
        target = self.model_cls.from_config(self.model_config)
        if model is not None:
            target.load_state_dict(model.state_dict())
        elif len(self.shadow_params) != self._num_params:
            raise ValueError(
                "LitEmaModel.save_pretrained: some parameters are frozen (not averaged); pass model= to take them from"
            )
        config = {k: v for k, v in self.state_dict().items() if k not in ("shadow_params", "tracked_names")}
        target.register_to_config(**config)
        self.copy_to(target)
        target.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path, model_cls, foreach: bool = True) -> LitEmaModel:
        """Load what ``save_pretrained`` wrote (or a folder saved by a plain ``EMAModel`` with update_after_step=-1)."""
        model = model_cls.from_pretrained(path)
        config = model_cls.load_config(path)
        keys = ("decay", "min_decay", "optimization_step", "update_after_step", "use_ema_warmup", "inv_gamma", "power")
        state = {k: config[k] for k in keys + _OWN_STATE_KEYS if k in config}
        ema = cls(
            model, decay=state.get("decay", 0.9999), use_num_updates=state.get("use_num_updates", True),
            update=state.get("update", "exact"), ldm_bug_compat=state.get("ldm_bug_compat", False),
            model_cls=model_cls, model_config=model.config,
        )  # fmt: skip
        ema.load_state_dict(state)
        return ema

    # ------------------------------------------------------------------ original LitEma buffers

    def to_original_state_dict(
        self, model: nn.Module | None = None, prefix: str = "model_ema.", module_prefix: str = "diffusion_model."
    ) -> dict[str, torch.Tensor]:
        """The original ``LitEma`` buffers: ``{prefix}decay`` (float32, 0-d), ``{prefix}num_updates`` (int32, 0-d),
        then ``{prefix}<(module_prefix + name) without dots>`` per tracked parameter, in the original's order.

        ``module_prefix="diffusion_model."`` because the original EMA tracks the ``DiffusionWrapper``, whose UNet
        is its ``diffusion_model`` child. Shadows are returned as references (clone before changing them).
        """
        out = {
            prefix + "decay": torch.tensor(self.decay, dtype=torch.float32),
            prefix + "num_updates": torch.tensor(self.num_updates, dtype=torch.int32),
        }
        for name, shadow in zip(self._names_for(model), self.shadow_params):
            key = prefix + (module_prefix + name).replace(".", "")
            if key in out:
                raise ValueError(f"LitEmaModel: parameter {name!r} maps to buffer {key!r}, which is already taken")
            out[key] = shadow.detach()
        return out

    @torch.no_grad()
    def load_original_state_dict(
        self,
        model: nn.Module | None,
        state_dict: Mapping[str, torch.Tensor],
        prefix: str = "model_ema.",
        module_prefix: str = "diffusion_model.",
        strict: bool = True,
    ) -> OriginalEmaLoadResult:
        """Load original ``LitEma`` buffers (other keys of a full checkpoint are ignored when ``prefix`` is set).

        Buffer names are derived from ``model.named_parameters()`` and looked up, never parsed back. With
        ``strict`` any missing or unexpected buffer raises; otherwise the matching ones load and the rest is returned.
        """
        names = self._names_for(model)
        expected = {prefix + (module_prefix + name).replace(".", ""): i for i, name in enumerate(names)}
        if len(expected) != len(names):
            raise ValueError("LitEmaModel: two tracked parameters map to the same original buffer name")
        scalars = (prefix + "decay", prefix + "num_updates")
        present = {k for k in state_dict if k.startswith(prefix)}
        missing = [k for k in (*scalars, *expected) if k not in state_dict]
        unexpected = sorted(present - set(expected) - set(scalars))
        if strict and (missing or unexpected):
            raise ValueError(
                f"LitEmaModel.load_original_state_dict: missing {len(missing)} buffer(s) {_short_list(missing)}, "
                f"unexpected {len(unexpected)} {_short_list(unexpected)}"
            )
        for key, i in expected.items():
            if key in state_dict and state_dict[key].shape != self.shadow_params[i].shape:
                raise ValueError(
                    f"LitEmaModel.load_original_state_dict: {key} has shape {tuple(state_dict[key].shape)}, "
                    f"expected {tuple(self.shadow_params[i].shape)}"
                )
        for key, i in expected.items():
            if key in state_dict:
                self.shadow_params[i].copy_(state_dict[key])
        if scalars[0] in state_dict:
            decay = float(state_dict[scalars[0]])
            if not 0.0 <= decay <= 1.0:
                raise ValueError(f"LitEmaModel.load_original_state_dict: {scalars[0]}={decay}, expected 0..1")
            self.decay = as_float32(decay)
        if scalars[1] in state_dict:
            self.num_updates = int(state_dict[scalars[1]])
            self.use_num_updates = self.num_updates >= 0
        return OriginalEmaLoadResult(missing, unexpected)

    @classmethod
    def from_original_state_dict(
        cls,
        model: nn.Module,
        state_dict: Mapping[str, torch.Tensor],
        prefix: str = "model_ema.",
        module_prefix: str = "diffusion_model.",
        **kwargs,
    ) -> LitEmaModel:
        """A ``LitEmaModel`` tracking ``model``, loaded (strictly) from original ``LitEma`` buffers."""
        ema = cls(model, **kwargs)
        ema.load_original_state_dict(model, state_dict, prefix=prefix, module_prefix=module_prefix)
        return ema
