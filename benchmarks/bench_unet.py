"""UNet train step and inference forward: ``LDMUNetModel`` against diffusers' same-architecture UNet (and the original).

For each model, in one process and one run, interleaved round by round (the order rotates every round):

- ``ours``: ``ldm_compat.models.unet_ldm.LDMUNetModel`` built from the original ``unet_config.params``;
- ``diffusers``: the stock ``UNet2DModel`` / ``UNet2DConditionModel`` of the same architecture
  (``ldm_compat.convert.native.native_unet_config``), holding the same weights (``to_native_unet``), so the outputs
  are compared too;
- ``original`` (only with ``--original-repo PATH``): the original ``openaimodel.UNetModel`` imported from a local
  checkout of CompVis/latent-diffusion or Stability-AI/stablediffusion (never vendored; it needs ``einops``), with
  the same weights (its state-dict keys are ours).

Train step = forward + MSE loss + backward + AdamW step (``fused=True`` on CUDA) + ``zero_grad(set_to_none=True)``;
inference = forward under ``torch.inference_mode`` in eval mode. CUDA runs under bf16 autocast, the CPU in float32.
``ratio`` is a contender's median time over diffusers' median time (< 1: faster than diffusers). Usage::

    python benchmarks/bench_unet.py --models cpu_small,cifar32 [--device cuda] [--json out.json]
    python benchmarks/bench_unet.py --count-only --models all       # parameter counts only (meta device)
    PYTHONPATH=/path/with/einops python benchmarks/bench_unet.py --original-repo ~/src/latent-diffusion
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    CudaPeaks,
    add_common_arguments,
    autocast,
    count_params,
    format_table,
    interleaved,
    machine,
    setup_device,
    summarize,
    write_json,
)

BASELINE = "diffusers"
_CIFAR = {"model_channels": 128, "attention_resolutions": [2], "num_res_blocks": 2, "channel_mult": [1, 2, 2, 2]}

#: ``unet``: the original ``unet_config.params``; ``batch``/``shape``: the input; ``context``: cross-attention
#: ``(tokens, dim)``. ``tiny`` is the smoke-test size.
MODELS: dict[str, dict] = {
    "tiny": {
        "unet": {"image_size": 16, "in_channels": 3, "out_channels": 3, "model_channels": 32,
                 "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2], "num_head_channels": 32},
        "batch": 2, "shape": (3, 16, 16),
    },
    # the smoke-test size of the cross-attention family (diffusers' UNet2DConditionModel)
    "tiny_sd": {
        "unet": {"image_size": 8, "in_channels": 4, "out_channels": 4, "model_channels": 32,
                 "attention_resolutions": [2, 1], "num_res_blocks": 1, "channel_mult": [1, 2], "num_heads": 2,
                 "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 32, "legacy": False},
        "batch": 2, "shape": (4, 8, 8), "context": (7, 32),
    },
    # the issue's CPU target; heads of 64 channels, as diffusers' attention_head_dim=64 (2 heads at the 128-wide level)
    "cpu_small": {
        "unet": {"image_size": 32, "in_channels": 3, "out_channels": 3, "model_channels": 64,
                 "attention_resolutions": [2], "num_res_blocks": 1, "channel_mult": [1, 2, 2], "num_head_channels": 64},
        "batch": 8, "shape": (3, 32, 32),
    },
    # DDPM CIFAR-10 (Ho et al.): one head of 256 channels, as google/ddpm-cifar10-32 (dropout left at 0 for both)
    "cifar32": {
        "unet": {"image_size": 32, "in_channels": 3, "out_channels": 3, **_CIFAR, "num_heads": 1},
        "batch": 128, "shape": (3, 32, 32),
    },
    # the published celebahq-ldm-vq-4 UNet (tests/fixtures/ldm_reference/layout_celebahq-ldm-vq-4.json), 274M
    "celebahq64": {
        "unet": {"image_size": 64, "in_channels": 3, "out_channels": 3, "model_channels": 224,
                 "attention_resolutions": [8, 4, 2], "num_res_blocks": 2, "channel_mult": [1, 2, 3, 4],
                 "num_head_channels": 32},
        "batch": 48, "shape": (3, 64, 64),
    },
    # SD-1.x (v1-inference.yaml) without use_checkpoint: 860M, 64×64×4 latents, CLIP context 77×768
    "sd15": {
        "unet": {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
                 "attention_resolutions": [4, 2, 1], "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4],
                 "num_heads": 8, "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 768,
                 "legacy": False},
        "batch": 16, "shape": (4, 64, 64), "context": (77, 768),
    },
}  # fmt: skip

#: The issue's targets. CPU: ours/diffusers train-step time ratio. CUDA (an H100): img/s, and GiB for sd15 train.
CPU_TARGETS = {("cpu_small", "train"): 0.70}
CUDA_TARGETS = {
    ("cifar32", "train"): 2500, ("celebahq64", "train"): 420, ("sd15", "train"): 100,
    ("celebahq64", "infer"): 1100, ("sd15", "infer"): 300,
}  # fmt: skip
SD15_TRAIN_GIB = 24


# ------------------------------------------------------------------------------------------------ contenders
def build_ours(params: dict, device: torch.device):
    from ldm_compat.models.unet_ldm import LDMUNetModel

    torch.manual_seed(0)
    model = LDMUNetModel(**params)
    with torch.no_grad():  # the original zero-initialises output projections; random ones make outputs comparable
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
    return model.to(device)


def build_diffusers(ours) -> torch.nn.Module:
    """The stock diffusers UNet of the same architecture, with ``ours``' weights."""
    from ldm_compat.convert.native import to_native_unet

    return to_native_unet(ours).to(next(ours.parameters()).device)


def load_original_class(repo: str):
    """``UNetModel`` of a local original checkout (CompVis/latent-diffusion or Stability-AI/stablediffusion)."""
    root = Path(repo).expanduser().resolve()
    if not (root / "ldm" / "modules" / "diffusionmodules" / "openaimodel.py").is_file():
        raise SystemExit(f"--original-repo {repo}: no ldm/modules/diffusionmodules/openaimodel.py there")
    sys.path.insert(0, str(root))
    try:
        from ldm.modules.diffusionmodules.openaimodel import UNetModel
    except ImportError as err:
        raise SystemExit(f"--original-repo {repo}: cannot import the original UNet ({err}); it needs einops") from None
    return UNetModel


def build_original(cls, params: dict, ours) -> torch.nn.Module:
    model = cls(**params)
    model.load_state_dict(ours.state_dict(), strict=True)  # the same keys: LDMUNetModel keeps the original tree
    return model.to(next(ours.parameters()).device)


def forward_fn(name: str):
    """``f(model, x, t, context) -> tensor`` for each contender's calling convention (``ours…``, ``diffusers…``,
    ``original``)."""
    if name.startswith("ours"):
        return lambda m, x, t, c: m(x, t, encoder_hidden_states=c).sample
    if name.startswith("diffusers"):
        return lambda m, x, t, c: (m(x, t, encoder_hidden_states=c) if c is not None else m(x, t)).sample
    return lambda m, x, t, c: m(x, timesteps=t, context=c)


def make_inputs(spec: dict, batch: int, device: torch.device):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *spec["shape"], generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    target = torch.randn(batch, *spec["shape"], generator=g)
    ctx = torch.randn(batch, *spec["context"], generator=g) if spec.get("context") else None
    return x.to(device), t.to(device), target.to(device), (ctx.to(device) if ctx is not None else None)


def optimizer_for(model, device: torch.device):
    # fused AdamW on CUDA (one kernel per step); the CPU default (foreach) otherwise
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True if device.type == "cuda" else None)


def train_step_fn(model, fwd, opt, inputs, device):
    x, t, target, ctx = inputs

    def step():
        with autocast(device):
            out = fwd(model, x, t, ctx)
        loss = F.mse_loss(out.float(), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def infer_fn(model, fwd, inputs, device):
    x, t, _, ctx = inputs

    def forward():
        with torch.inference_mode(), autocast(device):
            fwd(model, x, t, ctx)

    return forward


def state_bytes(model, opt=None) -> int:
    tensors = list(model.parameters())
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors)


# ------------------------------------------------------------------------------------------------ measuring
def measure_model(name: str, args, device: torch.device, original_cls) -> dict:
    spec = MODELS[name]
    ours = build_ours(spec["unet"], device)
    models = {"ours": ours, "diffusers": build_diffusers(ours)}
    if original_cls is not None:
        models["original"] = build_original(original_cls, spec["unet"], ours)
    batch = args.batch or spec["batch"]
    inputs = make_inputs(spec, batch, device)
    report = {"batch": batch, "input_shape": list(spec["shape"]), "unet_params": spec["unet"], "contenders": {}}
    for cname, model in models.items():
        report["contenders"][cname] = {"class": type(model).__name__, "parameters": count_params(model)}

    # the same function: float32 eval outputs on two samples of the batch, against ours
    x, t, _, ctx = inputs
    with torch.no_grad():
        ref = None
        for cname, model in models.items():
            out = forward_fn(cname)(model.eval(), x[:2], t[:2], ctx[:2] if ctx is not None else None).float()
            ref = out if ref is None else ref
            report["contenders"][cname]["max_abs_diff_vs_ours_fp32"] = (out - ref).abs().max().item()

    for mode in args.modes:
        measure_mode(models, mode, batch, inputs, args, device, report)
    return report


def measure_mode(models: dict, mode: str, batch: int, inputs, args, device: torch.device, report: dict) -> None:
    """Time ``mode`` (train or infer) of every contender, interleaved, into ``report["contenders"][name][mode]``."""
    cases, opts = {}, {}
    for cname, model in models.items():
        fwd = forward_fn(cname)
        if mode == "train":
            model.train()
            opts[cname] = optimizer_for(model, device)
            cases[cname] = train_step_fn(model, fwd, opts[cname], inputs, device)
        else:
            model.eval()
            cases[cname] = infer_fn(model, fwd, inputs, device)
    peaks = CudaPeaks(device)
    times = interleaved(
        cases, device, rounds=args.rounds, iters=args.iters, warmup=args.warmup, between=peaks.between,
        after=peaks.after,
    )  # fmt: skip
    base = statistics.median(times[BASELINE]["wall"])
    base_cpu = statistics.median(times[BASELINE]["cpu"])
    for cname, model in models.items():
        wall, cpu = summarize(times[cname]["wall"]), summarize(times[cname]["cpu"])
        entry = {
            "wall": wall, "cpu": cpu, "wall_samples_ms": [round(x * 1e3, 3) for x in times[cname]["wall"]],
            "img_per_s": batch / (wall["median_ms"] / 1e3),
            "ratio_vs_diffusers": wall["median_ms"] / 1e3 / base,
            "cpu_ratio_vs_diffusers": cpu["median_ms"] / 1e3 / base_cpu if base_cpu > 0 else None,
        }  # fmt: skip
        if device.type == "cuda":
            # the peak this contender would need alone: its own weights (+ optimizer state) plus what one step
            # allocated on top (the other contenders' weights are resident too, so the raw peak would mislead)
            entry["peak_gib_alone_est"] = (state_bytes(model, opts.get(cname)) + peaks.peaks.get(cname, 0)) / 2**30
        report["contenders"][cname][mode] = entry
    opts.clear()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def count_only(names: list[str], original_cls) -> dict:
    """Parameter counts of every contender, built on the meta device (no memory, no compute)."""
    import diffusers

    from ldm_compat.convert.native import native_unet_config
    from ldm_compat.models.unet_ldm import LDMUNetModel

    out = {}
    for name in names:
        params = MODELS[name]["unet"]
        with torch.device("meta"):
            ours = LDMUNetModel(**params)
            class_name, config = native_unet_config(params)
            theirs = getattr(diffusers, class_name).from_config(config)
            row = {"ours": count_params(ours), "diffusers": count_params(theirs), "diffusers_class": class_name}
            if original_cls is not None:
                row["original"] = count_params(original_cls(**params))
        out[name] = row
    return out


# ------------------------------------------------------------------------------------------------ reporting
def targets_for(report: dict) -> list[dict]:
    """Each applicable target of the issue with the measured figure and whether it is met."""
    rows = []
    cuda = report["machine"]["device"].startswith("cuda")
    for (model, mode), target in (CUDA_TARGETS if cuda else CPU_TARGETS).items():
        entry = report["models"].get(model, {}).get("contenders", {}).get("ours", {}).get(mode)
        if entry is None:
            continue
        if cuda:
            measured, met = entry["img_per_s"], entry["img_per_s"] >= target
            what = f"{model} {mode} img/s ≥ {target}"
            rows.append({"target": what, "measured": measured, "met": met})
            if (model, mode) == ("sd15", "train"):
                gib = entry.get("peak_gib_alone_est", float("nan"))
                rows.append({"target": f"sd15 train peak ≤ {SD15_TRAIN_GIB} GiB", "measured": gib,
                             "met": gib <= SD15_TRAIN_GIB})  # fmt: skip
        else:
            measured = entry["ratio_vs_diffusers"]
            rows.append({"target": f"{model} {mode} ours/diffusers ≤ {target}", "measured": measured,
                         "met": measured <= target})  # fmt: skip
    return rows


def print_report(report: dict) -> None:
    m = report["machine"]
    print(
        f"UNet benchmark, {m['device']} ({m['device_name']}, {m['torch_threads']} threads), torch {m['torch']}, "
        f"diffusers {m['diffusers']}, load average {m['loadavg_start']}"
    )
    print(f"{report['rounds']} rounds × {report['iters']} iterations after {report['warmup']} warm-up; "
          f"{'bf16 autocast' if m['device'].startswith('cuda') else 'float32'}\n")  # fmt: skip
    rows = []
    for model, r in report["models"].items():
        for mode in report["modes"]:
            for cname, c in r["contenders"].items():
                e = c[mode]
                cpu_ratio = e["cpu_ratio_vs_diffusers"]
                peak = e.get("peak_gib_alone_est")
                rows.append([
                    model, mode, cname, f"{c['parameters'] / 1e6:.2f}M", r["batch"], e["wall"]["median_ms"],
                    e["wall"]["iqr_ms"], e["img_per_s"], f"{e['ratio_vs_diffusers']:.3f}",
                    f"{cpu_ratio:.3f}" if cpu_ratio else "", f"{c['max_abs_diff_vs_ours_fp32']:.1e}",
                    f"{peak:.1f}" if peak is not None else "",
                ])  # fmt: skip
    print(format_table(
        ["model", "mode", "contender", "params", "batch", "median ms", "IQR ms", "img/s", "ratio", "CPU-time ratio",
         "max|Δ| fp32", "peak GiB"], rows))  # fmt: skip
    if report["targets"]:
        print()
        print(format_table(["target", "measured", "met"], [[t["target"], t["measured"], t["met"]]
                                                           for t in report["targets"]]))  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(p)
    p.add_argument("--models", default="cpu_small", help=f"comma-separated, or 'all': {', '.join(MODELS)}")
    p.add_argument("--modes", default="train,infer", help="train, infer or both (comma-separated)")
    p.add_argument("--batch", type=int, default=None, help="override every model's batch size")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    p.add_argument("--iters", type=int, default=4, help="timed iterations of each contender per round")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations of each contender first")
    p.add_argument("--original-repo", default=None, metavar="PATH", help="local original checkout to compare with")
    p.add_argument("--count-only", action="store_true", help="print parameter counts (meta device) and exit")
    args = p.parse_args(argv)
    args.models = list(MODELS) if args.models == "all" else [m for m in args.models.split(",") if m]
    unknown = [m for m in args.models if m not in MODELS]
    if unknown or not args.models:
        p.error(f"--models: unknown {unknown}; expected some of {', '.join(MODELS)}")
    args.modes = [m for m in args.modes.split(",") if m]
    if not args.modes or any(m not in ("train", "infer") for m in args.modes):
        p.error("--modes: expected train, infer or train,infer")
    if args.rounds < 1 or args.iters < 1 or args.warmup < 0 or (args.batch is not None and args.batch < 1):
        p.error("--rounds/--iters/--batch must be ≥ 1 and --warmup ≥ 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    device = setup_device(args.device, args.threads if args.device == "cpu" else None)
    original_cls = load_original_class(args.original_repo) if args.original_repo else None
    if args.count_only:
        counts = count_only(args.models, original_cls)
        cols = ["model", "ours", "diffusers", "diffusers class"] + (["original"] if original_cls else [])
        print(format_table(cols, [[n, r["ours"], r["diffusers"], r["diffusers_class"]] + ([r["original"]]
                                  if original_cls else []) for n, r in counts.items()]))  # fmt: skip
        report = {"benchmark": "unet_params", "models": counts}
        write_json(args.json, report)
        return report
    report = {
        "benchmark": "unet", "machine": machine(device), "rounds": args.rounds, "iters": args.iters,
        "warmup": args.warmup, "modes": args.modes, "original_repo": args.original_repo, "models": {},
    }  # fmt: skip
    for name in args.models:
        report["models"][name] = measure_model(name, args, device, original_cls)
    report["targets"] = targets_for(report)
    print_report(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
