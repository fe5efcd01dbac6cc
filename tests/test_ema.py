"""LitEmaModel against the original LitEma: the golden trajectory, the checkpoints' model_ema.* buffers, and state."""

from __future__ import annotations

import copy
import io

import numpy as np
import pytest
import torch
from diffusers.training_utils import EMAModel
from reference_cases import CASES, load_case, load_litema_trajectory
from torch import nn

from ldm_compat.training.ema import LitEmaModel, litema_decay

EMA_CASES = [name for name in CASES if load_case(name).has_ema]
TRAJECTORY_TOL = 1e-7  # issue 5 acceptance


# ---------------------------------------------------------------------------------------------- helpers


def _trajectory_module(weights: dict[str, torch.Tensor]) -> nn.Sequential:
    """The fixture's module: Sequential(Linear(4,8), GroupNorm(2,8) with its weight frozen, Linear(8,3))."""
    module = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.Linear(8, 3))
    module[1].weight.requires_grad_(False)
    _load(module, weights)
    return module


@torch.no_grad()
def _load(module: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    for name, p in module.named_parameters():
        p.copy_(weights[name])


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _module_from_state_dict(sd: dict[str, torch.Tensor]) -> nn.Module:
    """A plain module whose ``named_parameters()`` are exactly ``sd``'s keys, in order (a stand-in UNet)."""
    root = nn.Module()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        node = root
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, nn.Parameter(value.clone()))
    return root


class _Wrapper(nn.Module):
    """Like the original DiffusionWrapper: the UNet is the ``diffusion_model`` child."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.diffusion_model = unet


def _litema_reference(model: nn.Module, decay: float, steps: list[dict[str, torch.Tensor]], num_updates: int = 0):
    """The original ``LitEma.forward`` written out per parameter (float32 tensor decay, int32 counter)."""
    decay_t = torch.tensor(decay, dtype=torch.float32)
    n = torch.tensor(num_updates, dtype=torch.int)
    shadows = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    history = []
    for weights in steps:
        _load(model, weights)
        d = decay_t
        if n >= 0:
            n += 1
            d = min(decay_t, (1 + n) / (10 + n))
        one_minus = 1.0 - d
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.requires_grad:
                    shadows[name].sub_(one_minus * (shadows[name] - p))
        history.append({k: v.clone() for k, v in shadows.items()})
    return history


def _random_steps(model: nn.Module, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out, current = [], {n: p.detach().clone() for n, p in model.named_parameters()}
    for _ in range(count):
        current = {n: v + 0.1 * torch.randn(v.shape, generator=gen) for n, v in current.items()}
        out.append(current)
    return out


def _mlp() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 7), nn.LayerNorm(7), nn.Linear(7, 2))


# ---------------------------------------------------------------------------------------------- the golden trajectory


@pytest.mark.parametrize("source", ["module", "parameters"])
def test_litema_trajectory_is_reproduced(source):
    meta, tensors = load_litema_trajectory()
    module = _trajectory_module(_prefixed(tensors, "init.model."))
    ema = LitEmaModel(module if source == "module" else module.parameters(), decay=meta["decay"])
    assert ema.use_num_updates is meta["use_num_upates"]
    steps = sorted({k.split(".")[0] for k in tensors if k.startswith("step")})
    assert len(steps) == 12
    for step in steps:
        _load(module, _prefixed(tensors, f"{step}.model."))
        ema.step(module)
        expected = _prefixed(tensors, f"{step}.ema.")
        ours = ema.to_original_state_dict(module, prefix="", module_prefix="")
        # same buffers, no '1weight' (the frozen one); safetensors sorts keys, so order is checked on the ckpts
        assert sorted(ours) == sorted(expected), step
        for key, value in expected.items():
            assert ours[key].dtype == value.dtype and ours[key].shape == value.shape, (step, key)
            err = (ours[key].double() - value.double()).abs().max().item()
            assert err <= TRAJECTORY_TOL, (step, key, err)
    # the frozen GroupNorm weight has no shadow, so copy_to leaves the model's value in place
    frozen_before = module[1].weight.detach().clone()
    ema.copy_to(module)
    assert torch.equal(module[1].weight, frozen_before)
    last = _prefixed(tensors, f"{steps[-1]}.ema.")
    for name, p in module.named_parameters():
        if name != "1.weight":
            assert (p.detach() - last[name.replace(".", "")]).abs().max().item() <= TRAJECTORY_TOL


def test_lerp_update_stays_within_float32_rounding_of_the_trajectory():
    meta, tensors = load_litema_trajectory()
    module = _trajectory_module(_prefixed(tensors, "init.model."))
    ema = LitEmaModel(module, decay=meta["decay"], update="lerp")
    for step in sorted({k.split(".")[0] for k in tensors if k.startswith("step")}):
        _load(module, _prefixed(tensors, f"{step}.model."))
        ema.step(module)
        ours = ema.to_original_state_dict(module, prefix="", module_prefix="")
        for key, value in _prefixed(tensors, f"{step}.ema.").items():
            # one fused multiply-add instead of LitEma's three roundings: a few float32 ulps at |x| < 4
            assert torch.allclose(ours[key], value, rtol=0, atol=1e-6), (step, key)


# ---------------------------------------------------------------------------------------------- decay schedule


def test_decay_schedule_follows_litema():
    decay32 = np.float32(0.9999)
    for n in (1, 2, 3, 10, 1000, 89990, 89991, 10**6):
        expected = min(decay32, np.float32(1 + n) / np.float32(10 + n))
        assert litema_decay(0.9999, n) == float(expected), n
    assert litema_decay(0.9999, 1) == float(np.float32(2) / np.float32(11))  # 0.1818..., diffusers' default gives 0
    assert litema_decay(0.9999, -1) == float(decay32)


def test_use_num_updates_false_keeps_constant_decay():
    model = _mlp()
    steps = _random_steps(model, 5)
    reference = _litema_reference(_mlp(), 0.99, steps, num_updates=-1)
    ema = LitEmaModel(model, decay=0.99, use_num_upates=False)  # the original's spelling is accepted
    assert ema.num_updates == -1
    for weights, expected in zip(steps, reference):
        _load(model, weights)
        ema.step(model)
        assert ema.num_updates == -1 and ema.cur_decay_value == float(np.float32(0.99))
        for shadow, name in zip(ema.shadow_params, expected):
            assert torch.equal(shadow, expected[name])


def test_matches_litema_across_the_decay_cap():
    """Start near n = 89990, where (1+n)/(10+n) overtakes 0.9999, and compare with LitEma's own loop bit for bit."""
    model = _mlp()
    steps = _random_steps(model, 12, seed=3)
    reference = _litema_reference(_mlp(), 0.9999, steps, num_updates=89984)
    ema = LitEmaModel(model)
    ema.num_updates = 89984
    for weights, expected in zip(steps, reference):
        _load(model, weights)
        ema.step(model)
        for shadow, name in zip(ema.shadow_params, expected):
            assert torch.equal(shadow, expected[name])
    assert ema.num_updates == 89996 and ema.cur_decay_value == float(np.float32(0.9999))


def test_update_is_fused(monkeypatch):
    calls = []
    real = torch._foreach_mul_
    monkeypatch.setattr(torch, "_foreach_mul_", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(10)])
    ema = LitEmaModel(model)
    ema.step(model)
    assert calls == [20]  # one call over all 20 parameters, not one per parameter
    chunked = LitEmaModel(nn.Sequential(*[nn.Linear(3, 3) for _ in range(10)]))
    chunked.shadow_params = [s.clone() for s in ema.shadow_params]
    chunked.num_updates = ema.num_updates
    chunked.chunk_elements = 24  # a Linear(3, 3) has 9 + 3 elements: chunks of 4 tensors
    calls.clear()
    _load(model, _random_steps(model, 1)[0])
    ema.step(model)
    chunked.step(model)
    assert calls == [20] + [4] * 5  # the unchunked EMA, then five chunks
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, chunked.shadow_params))


@pytest.mark.parametrize("chunk_elements", [None, 1, 50])
def test_every_update_path_matches_litema(chunk_elements):
    """CPU workspace path (one dtype) and the allocating path (mixed float32/float64 shadows, as on accelerators)."""
    for dtypes in ((torch.float32,) * 3, (torch.float32, torch.float64, torch.float32)):
        model = _mlp()
        for layer, dtype in zip(model, dtypes):
            layer.to(dtype)
        steps = _random_steps(model, 6, seed=5)
        reference = _litema_reference(copy.deepcopy(model), 0.999, steps)
        ema = LitEmaModel(model, decay=0.999)
        ema.chunk_elements = chunk_elements
        for weights, expected in zip(steps, reference):
            _load(model, weights)
            ema.step(model)
            for shadow, name in zip(ema.shadow_params, expected):
                assert shadow.dtype == expected[name].dtype and torch.equal(shadow, expected[name]), (dtypes, name)


# ---------------------------------------------------------------------------------------------- original buffers


@pytest.mark.parametrize("name", EMA_CASES)
def test_original_buffers_round_trip(name):
    case = load_case(name)
    unet = _module_from_state_dict(case.unet_state_dict())
    ema = LitEmaModel.from_original_state_dict(unet, case.state_dict)
    original = {"model_ema." + k: v for k, v in case.ema_buffers().items()}
    out = ema.to_original_state_dict(unet)
    assert list(out) == list(original)  # names and order of the original LitEma state_dict
    for key, value in original.items():
        assert out[key].dtype == value.dtype and out[key].shape == value.shape, key
        assert torch.equal(out[key], value), key
    assert out["model_ema.decay"].dtype == torch.float32 and out["model_ema.decay"].dim() == 0
    assert out["model_ema.num_updates"].dtype == torch.int32 and out["model_ema.num_updates"].dim() == 0
    assert ema.num_updates == int(original["model_ema.num_updates"]) and ema.decay == float(original["model_ema.decay"])
    # the EMA is not the training weights in these checkpoints, so copy_to really moves them
    with ema.ema_scope(unet):
        for (pname, p), shadow in zip(unet.named_parameters(), ema.shadow_params):
            assert torch.equal(p, shadow), pname
    assert all(torch.equal(p, case.unet_state_dict()[n]) for n, p in unet.named_parameters())
    # the same names when the EMA tracks a DiffusionWrapper-like module (names already carry diffusion_model.)
    wrapped = LitEmaModel.from_original_state_dict(_Wrapper(unet), case.state_dict, module_prefix="")
    assert list(wrapped.to_original_state_dict(_Wrapper(unet), module_prefix="")) == list(original)


def test_original_buffers_errors_name_the_keys():
    case = load_case(EMA_CASES[0])
    unet = _module_from_state_dict(case.unet_state_dict())
    ema = LitEmaModel(unet)
    sd = dict(case.state_dict)
    dropped = "model_ema.diffusion_modelout2bias"
    assert dropped in sd
    del sd[dropped]
    sd["model_ema.diffusion_modelnotaparam"] = torch.zeros(1)
    with pytest.raises(ValueError, match="missing 1 buffer.*out2bias.*unexpected 1.*notaparam"):
        ema.load_original_state_dict(unet, sd)
    result = ema.load_original_state_dict(unet, sd, strict=False)
    assert result.missing_keys == [dropped] and result.unexpected_keys == ["model_ema.diffusion_modelnotaparam"]
    bad = dict(case.state_dict)
    key = "model_ema.diffusion_modelout2weight"
    bad[key] = torch.zeros(1)
    with pytest.raises(ValueError, match=f"{key} has shape"):
        ema.load_original_state_dict(unet, bad)
    with pytest.raises(ValueError, match="lacks tracked parameter"):
        ema.to_original_state_dict(nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------- diffusers state


def _stepped_ema(count: int = 4, **kwargs) -> tuple[nn.Module, LitEmaModel, list]:
    model = _mlp()
    ema = LitEmaModel(model, **kwargs)
    steps = _random_steps(model, count + 3, seed=7)
    for weights in steps[:count]:
        _load(model, weights)
        ema.step(model)
    return model, ema, steps[count:]


def test_state_dict_round_trip_is_exact():
    model, ema, more = _stepped_ema(decay=0.999)
    buf = io.BytesIO()
    torch.save(ema.state_dict(), buf)
    other = LitEmaModel(_mlp())
    before = [s.data_ptr() for s in other.shadow_params]
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    assert [s.data_ptr() for s in other.shadow_params] == before  # copied in place: device and dtype kept
    assert other.num_updates == ema.num_updates == 4 and other.decay == ema.decay == float(np.float32(0.999))
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, other.shadow_params))
    for weights in more:
        _load(model, weights)
        ema.step(model)
        other.step(model)
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, other.shadow_params))
    with pytest.raises(ValueError, match="update_after_step"):
        other.load_state_dict({**ema.state_dict(), "update_after_step": 0})
    with pytest.raises(ValueError, match="shadow_params"):
        other.load_state_dict({**ema.state_dict(), "shadow_params": ema.shadow_params[:1]})


def test_state_dict_loads_into_stock_ema_model():
    model, ema, more = _stepped_ema(decay=0.9999)
    stock = EMAModel([p for p in model.parameters() if p.requires_grad], foreach=False)
    stock.load_state_dict({k: v for k, v in ema.state_dict().items() if k in EMAModel([]).state_dict()})
    for n in range(ema.num_updates + 1, ema.num_updates + 4):  # same schedule, up to float64-vs-float32 rounding
        assert stock.get_decay(n) == pytest.approx(ema.get_decay(n), rel=1e-7, abs=0)


def test_accelerate_checkpoint_round_trip(tmp_path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model, ema, more = _stepped_ema()
    accelerator = Accelerator(cpu=True, project_dir=str(tmp_path))
    try:
        accelerator.register_for_checkpointing(ema)
        accelerator.save_state(str(tmp_path / "ckpt"))
        saved = [s.clone() for s in ema.shadow_params], ema.num_updates
        for weights in more:
            _load(model, weights)
            ema.step(model)
        assert ema.num_updates != saved[1]
        accelerator.load_state(str(tmp_path / "ckpt"))
        assert ema.num_updates == saved[1]
        assert all(torch.equal(a, b) for a, b in zip(saved[0], ema.shadow_params))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def test_save_and_load_pretrained(tmp_path):
    from diffusers import UNet2DModel

    kwargs = dict(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16))
    kwargs.update(norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    unet = UNet2DModel(**kwargs)
    ema = LitEmaModel(unet, model_cls=UNet2DModel, model_config=unet.config)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    ema.step(unet)
    ema.save_pretrained(tmp_path / "ema")
    loaded = LitEmaModel.from_pretrained(tmp_path / "ema", model_cls=UNet2DModel)
    assert loaded.num_updates == 1 and loaded.decay == ema.decay
    assert all(torch.equal(a, b) for a, b in zip(ema.shadow_params, loaded.shadow_params))
    unet.conv_in.weight.requires_grad_(False)
    partial = LitEmaModel(unet, model_cls=UNet2DModel, model_config=unet.config)
    with pytest.raises(ValueError, match="pass model="):
        partial.save_pretrained(tmp_path / "partial")
    partial.save_pretrained(tmp_path / "partial", model=unet)
    assert torch.equal(UNet2DModel.from_pretrained(tmp_path / "partial").conv_in.weight, unet.conv_in.weight)


# ---------------------------------------------------------------------------------------------- behaviour


def test_ema_scope_swaps_and_restores_all_parameters():
    model, ema, _ = _stepped_ema()
    model[1].weight.requires_grad_(False)  # frozen after construction: still swapped (it has a shadow)
    training = [p.detach().clone() for p in model.parameters()]
    with ema.ema_scope(model, context="Validation") as inside:
        assert inside is model
        assert all(torch.equal(p, s) for p, s in zip(model.parameters(), ema.shadow_params))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), training))
    with pytest.raises(RuntimeError, match="store"):
        ema.restore(model)


def test_frozen_or_unfrozen_after_construction_is_skipped():
    model = _mlp()
    model[1].bias.requires_grad_(False)
    ema = LitEmaModel(model)  # '1.bias' untracked
    assert len(ema.shadow_params) == 5
    model[1].bias.requires_grad_(True)  # original: KeyError
    model[2].weight.requires_grad_(False)  # original: AssertionError
    kept = ema.shadow_params[3].clone()
    _load(model, _random_steps(model, 1)[0])
    ema.step(model)
    assert torch.equal(ema.shadow_params[3], kept)
    assert not torch.equal(ema.shadow_params[0], model[0].weight)
    assert "1bias" not in "".join(ema.to_original_state_dict(model, prefix="", module_prefix=""))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_model_keeps_float32_shadows(dtype):
    model = _mlp().to(dtype)
    ema = LitEmaModel(model)
    assert all(s.dtype == torch.float32 for s in ema.shadow_params)
    expected = [p.detach().float().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.step(model)
    omd = float(1.0 - torch.tensor(2.0) / torch.tensor(11.0))
    for s, e, p in zip(ema.shadow_params, expected, model.parameters()):
        assert torch.equal(s, e - omd * (e - p.float()))
    ema.copy_to(model)
    assert all(p.dtype == dtype for p in model.parameters())


def test_ldm_bug_compat_reproduces_the_frozen_half_precision_ema():
    model = _mlp()
    ema = LitEmaModel(model, ldm_bug_compat=True)
    initial = [s.clone() for s in ema.shadow_params]
    model.to(torch.bfloat16)
    _load(model, _random_steps(model, 1)[0])
    ema.step(model)
    assert ema.num_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(initial, ema.shadow_params))  # the original's lost update
    fixed = LitEmaModel(_mlp())
    fixed.step(model)
    assert not torch.equal(fixed.shadow_params[0], initial[0])


def test_resets():
    model, ema, more = _stepped_ema(use_num_updates=False)
    ema.reset_num_updates()  # SD2 reset_num_ema_updates: 0 even when use_num_updates was False
    assert ema.num_updates == 0
    model[0].weight.requires_grad_(False)
    _load(model, more[0])
    ema.reset_to(model)  # SD2 reset_ema: a fresh LitEma from the current weights
    assert ema.num_updates == -1 and len(ema.shadow_params) == 5
    assert all(torch.equal(s, p) for s, p in zip(ema.shadow_params, list(model.parameters())[1:]))


def test_bad_options_raise_value_errors():
    model = _mlp()
    with pytest.raises(ValueError, match="decay=1.5"):
        LitEmaModel(model, decay=1.5)
    with pytest.raises(ValueError, match="update='fast'"):
        LitEmaModel(model, update="fast")
    with pytest.raises(ValueError, match="use_ema_warmup"):
        LitEmaModel(model, use_ema_warmup=True)
    ema = LitEmaModel(model)
    with pytest.raises(ValueError, match="got 2 parameters"):
        ema.step(list(model.parameters())[:2])
    with pytest.raises(ValueError, match="no parameter"):
        ema.step(nn.Linear(2, 2))


@pytest.mark.parametrize("name", EMA_CASES)
def test_ema_scope_reproduces_the_original_ema_outputs(name):
    """The checkpoint's EMA, loaded through LitEmaModel into the real UNet, gives the original's ``unet_out_ema``."""
    from ldm_compat.models.conditioning import apply_model
    from ldm_compat.models.unet_ldm import LDMUNetModel

    case = load_case(name)
    unet = LDMUNetModel.from_ldm_config(case.unet_config).eval()
    unet.load_original_state_dict(case.state_dict)
    ema = LitEmaModel.from_original_state_dict(unet, case.state_dict)
    args = (case.io["x_noisy"], case.io["t"], case.io.get("context"), case.params.get("conditioning_key"))
    training = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad(), ema.ema_scope(unet):
        averaged = apply_model(unet, *args)
    assert (averaged - case.io["unet_out_ema"]).abs().max().item() <= 1e-5
    assert not torch.allclose(case.io["unet_out"], case.io["unet_out_ema"], atol=1e-3)  # the test can tell them apart
    assert all(torch.equal(p, training[n]) for n, p in unet.named_parameters())  # training weights are back
