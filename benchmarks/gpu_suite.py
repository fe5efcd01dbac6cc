"""Everything issue 17 measures, in one run on one GPU (< 8 min on an H100/H200), or in seconds on the CPU (--smoke).

Sections, in this order (a section that fails is recorded with its error and the suite goes on; a section that
would not finish within ``--budget-s`` is skipped and recorded as such):

- ``unet``: train step and inference of ``LDMUNetModel`` against diffusers' own model of the same architecture
  (``UNet2DModel`` for celebahq64, ``UNet2DConditionModel`` for SD-1.5 at 64×64 latents, batch 16), with peak memory
  (``bench_unet.measure_model``);
- ``e2e``: the ``Trainer``'s whole optimizer step (data, noise, UNet, fused AdamW, EMA) against the same plain loop
  with diffusers' model and ``EMAModel`` (``bench_train.run``);
- ``ema``: one EMA update of the 274M-parameter celebahq64 UNet against diffusers' ``EMAModel(foreach=True)``
  (``bench_ema.run``), plus float32 shadows of a bf16 copy and the number of CUDA kernels each update launches;
- ``sync``: ``torch.cuda.set_sync_debug_mode("error")`` over the Trainer's steps between check points;
- ``compiled``: ``torch.compile(fullgraph=True)`` of ours (train and inference) against diffusers eager;
- ``projection``: 1×1 ``Conv1d``/``Conv2d`` against ``Linear`` for the attention projections at the published
  shapes (forward + backward), the evidence for keeping or replacing the original's convolutions;
- ``backends``: SD-1.5 inference with each PyTorch SDPA backend of diffusers' dispatcher;
- ``channels_last``: celebahq64 train step in channels_last against the default layout.

CUDA: bf16 autocast, float32 weights, fused AdamW. Writes ``<results-dir>/<date>-<gpu>.json`` (device, versions,
every figure, each section's seconds and error) and a table into ``--results-md`` between markers (a re-run with the
same JSON name replaces its table). Usage::

    benchmarks/gpu_suite.sh [--budget-s 450]
    python benchmarks/gpu_suite.py --smoke --results-dir /tmp/r --results-md /tmp/r/RESULTS.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import re
import statistics
import sys
import tempfile
import time
import traceback
from argparse import Namespace
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_ema  # noqa: E402
import bench_train  # noqa: E402
import bench_unet  # noqa: E402
from _common import autocast, format_table, interleaved, machine, summarize, synchronize, write_json  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """The sizes and counts of one run: the real one (GPU) or the smoke test (CPU, tiny)."""

    celeba: str  # bench_unet model for the UNet2DModel family
    sd: str  # bench_unet model for the UNet2DConditionModel family
    train_model: str  # bench_train model of the end-to-end step
    sync_model: str  # bench_train model of the sync check
    rounds: int
    iters: int
    warmup: int
    ema_rounds: int
    compile_backend: str
    compiled: tuple  # (family, modes) measured compiled
    estimates_s: dict  # section -> seconds it may take (for the budget)


REAL = Plan("celebahq64", "sd15", "celebahq64", "small", rounds=3, iters=4, warmup=3, ema_rounds=20,
            compile_backend="inductor", compiled=(("celebahq64", ("train", "infer")), ("sd15", ("train", "infer"))),
            estimates_s={"unet": 90, "e2e": 60, "ema": 40, "sync": 40, "projection": 20, "backends": 30,
                         "channels_last": 30, "compiled": 240})  # fmt: skip
# the smoke test compiles one tiny graph (dynamo tracing alone takes seconds per graph on a small CPU)
SMOKE = Plan("tiny", "tiny_sd", "tiny", "tiny", rounds=1, iters=1, warmup=1, ema_rounds=2, compile_backend="eager",
             compiled=(("celebahq64", ("infer",)),), estimates_s={})  # fmt: skip

#: the issue's targets (an H100); ``None``: reported, no target
TARGETS = {
    "celebahq64 train img/s": 420, "sd15 train img/s": 100, "sd15 train peak GiB": 24, "celebahq64 infer img/s": 1100,
    "sd15 infer img/s": 300, "e2e celebahq64 img/s": 400, "ema 274M ms": 1.5,
}  # fmt: skip


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timing_args(plan: Plan, **extra) -> Namespace:
    return Namespace(rounds=plan.rounds, iters=plan.iters, warmup=plan.warmup, batch=None, **extra)


# ------------------------------------------------------------------------------------------------ sections
def section_unet(plan: Plan, device: torch.device) -> dict:
    args = timing_args(plan, modes=["train", "infer"])
    out = {}
    for family, name in (("celebahq64", plan.celeba), ("sd15", plan.sd)):
        out[family] = bench_unet.measure_model(name, args, device, None)
        free_memory()
    return out


def section_compiled(plan: Plan, device: torch.device) -> dict:
    """Ours under ``torch.compile(fullgraph=True)`` (a graph break is an error) against diffusers eager."""
    out = {}
    for family, modes in plan.compiled:
        name = plan.celeba if family == "celebahq64" else plan.sd
        try:
            out[family] = measure_compiled(name, modes, plan, device, fullgraph=True)
        except Exception as err:  # a graph break (or another compile failure): record it, measure without fullgraph
            free_memory()
            out[family] = measure_compiled(name, modes, plan, device, fullgraph=False)
            out[family]["fullgraph_error"] = "".join(traceback.format_exception(err)[-10:])
        free_memory()
    return out


def measure_compiled(name: str, modes, plan: Plan, device: torch.device, fullgraph: bool) -> dict:
    spec = bench_unet.MODELS[name]
    torch._dynamo.reset()
    ours = bench_unet.build_ours(spec["unet"], device)
    models = {"ours_compiled": torch.compile(ours, fullgraph=fullgraph, backend=plan.compile_backend),
              "diffusers": bench_unet.build_diffusers(ours)}  # fmt: skip
    inputs = bench_unet.make_inputs(spec, spec["batch"], device)
    report = {"batch": spec["batch"], "backend": plan.compile_backend, "fullgraph": fullgraph,
              "contenders": {k: {} for k in models}}  # fmt: skip
    for mode in modes:
        started = time.perf_counter()
        bench_unet.measure_mode(models, mode, spec["batch"], inputs, timing_args(plan), device, report)
        report[f"{mode}_seconds_with_compile"] = time.perf_counter() - started
    return report


def section_e2e(plan: Plan, device: torch.device) -> dict:
    args = timing_args(plan, model=plan.train_model, timesteps=1000, workers=0, diffusers=True)
    return bench_train.run(args, device)


def section_ema(plan: Plan, device: torch.device) -> dict:
    name = "celebahq64" if plan is REAL else plan.celeba
    report = bench_ema.run(str(device), plan.ema_rounds, plan.warmup, "wall", name)
    base = report["results"]["ema_model_foreach"]["median_ms"]
    for entry in report["results"].values():
        entry["ratio_vs_diffusers_foreach"] = entry["median_ms"] / base
    report["half_params"] = attempt(ema_half_params, name, plan, device)
    if device.type == "cuda":
        report["cuda_kernels_per_update"] = attempt(ema_kernel_counts, name, device)
    free_memory()
    return report


def attempt(fn, *args):
    """``fn(*args)``, or ``{"error": ...}``: a part of a section that fails leaves the rest of it."""
    try:
        return fn(*args)
    except Exception as err:
        return {"error": "".join(traceback.format_exception(err)[-8:])}


def ema_half_params(name: str, plan: Plan, device: torch.device) -> dict:
    """Float32 shadows of a bf16 model (what a bf16-weight run keeps), exact and lerp, against EMAModel there."""
    from diffusers.training_utils import EMAModel

    from ldm_compat.training.ema import LitEmaModel

    model = bench_ema.build_model(str(device), name).to(torch.bfloat16)
    params = list(model.parameters())
    exact, lerp = LitEmaModel(model), LitEmaModel(model, update="lerp")
    stock = EMAModel(params, foreach=True)
    shadow_dtypes = sorted({str(s.dtype) for s in exact.shadow_params})
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p))
    cases = {"ours_exact": lambda: exact.step(model), "ours_lerp": lambda: lerp.step(model),
             "ema_model_foreach": lambda: stock.step(params)}  # fmt: skip
    times = interleaved(cases, device, rounds=plan.ema_rounds, iters=1, warmup=plan.warmup)
    base = statistics.median(times["ema_model_foreach"]["wall"])
    results = {k: {**summarize(t["wall"]), "ratio_vs_diffusers_foreach": statistics.median(t["wall"]) / base}
               for k, t in times.items()}  # fmt: skip
    return {"param_dtype": "torch.bfloat16", "ours_shadow_dtypes": shadow_dtypes, "results": results}


def ema_kernel_counts(name: str, device: torch.device) -> dict:
    """CUDA kernels launched by one update (torch.profiler): a fused chain is a few per ~100 tensors, not 3 each."""
    from diffusers.training_utils import EMAModel
    from torch.profiler import ProfilerActivity, profile

    from ldm_compat.training.ema import LitEmaModel

    model = bench_ema.build_model(str(device), name)
    half = copy.deepcopy(model).to(torch.bfloat16)
    ours, ours_half, stock = LitEmaModel(model), LitEmaModel(half), EMAModel(list(model.parameters()), foreach=True)
    loop = bench_ema.LoopLitEma(model)
    cases = {
        "ours_exact": lambda: ours.step(model),
        "ours_exact_bf16_params": lambda: ours_half.step(half),
        "ema_model_foreach": lambda: stock.step(model.parameters()),
        "litema_loop": lambda: loop.step(model),
    }
    counts = {"tensors": len(list(model.parameters()))}
    for key, fn in cases.items():
        fn()
        synchronize(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            synchronize(device)
        counts[key] = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    return counts


def section_sync(plan: Plan, device: torch.device) -> dict:
    """The Trainer's steps between check points under ``set_sync_debug_mode("error")`` (CUDA; on the CPU the same
    steps run without it, so the smoke test covers the code)."""
    from ldm_compat.training.loop import Trainer, TrainOptions

    warmup, steps, log_every = 2, 12, 5
    config = bench_train.train_config(plan.sync_model, bench_train.MODELS[plan.sync_model][1], 1000)
    config["model"]["params"]["learn_logvar"] = True
    config["lightning"]["trainer"].update(max_steps=steps, log_every_n_steps=log_every, gradient_clip_val=1.0)
    cuda = device.type == "cuda"
    checked, error = [], None
    with tempfile.TemporaryDirectory(prefix="gpu_suite_sync_") as out:
        options = TrainOptions(output_dir=out, report_to="none", checkpointing_steps=None,
                               mixed_precision="bf16" if cuda else "no")  # fmt: skip
        trainer = Trainer(config, options, source="gpu_suite sync")
        after_step = trainer._after_step

        def guarded_after_step(batch, logs):
            if trainer._is_check_point(trainer.state.global_step):
                set_mode(0)  # a check point reads the device
            after_step(batch, logs)
            set_mode(0)
            upcoming = trainer.state.global_step + 1
            if upcoming > warmup and not trainer._is_check_point(upcoming):
                checked.append(upcoming)
                set_mode("error")

        def set_mode(mode):
            if cuda:
                torch.cuda.set_sync_debug_mode(mode)

        trainer._after_step = guarded_after_step
        try:
            trainer.fit()
        except RuntimeError as err:  # a synchronising call under "error" mode
            error = "".join(traceback.format_exception(err)[-12:])
        finally:
            set_mode(0)
    # on the CPU there is nothing to check (tests/test_sync_free.py counts the reads there)
    ok = (error is None and bool(checked)) if cuda else None
    return {"mode": "error" if cuda else "none (CPU): the steps ran unchecked", "checked_steps": checked, "ok": ok,
            "error": error}  # fmt: skip


def section_projection(plan: Plan, device: torch.device) -> dict:
    """Attention projections as the original's 1×1 convolutions against ``Linear`` on the same weights."""
    smoke = plan is not REAL
    # (name, batch, channels, tokens): celebahq64's AttentionBlocks at ds 2/4/8, SD-1.5's proj_in/proj_out levels
    shapes = [("ab_ds2", 48, 448, 1024), ("ab_ds4", 48, 672, 256), ("ab_ds8", 48, 896, 64),
              ("st_64", 16, 320, 4096), ("st_32", 16, 640, 1024), ("st_16", 16, 1280, 256)]  # fmt: skip
    if smoke:
        shapes = [("ab_tiny", 2, 32, 16), ("st_tiny", 2, 64, 16)]
    out = {}
    for name, b, c, t in shapes:
        rows = 3 * c if name.startswith("ab") else c  # qkv (3C rows) or proj_in (C rows)
        med = time_projection(b, c, t, rows, plan, device)
        out[name] = {"batch": b, "channels": c, "tokens": t, "conv_ms": med["conv"], "linear_ms": med["linear"],
                     "linear_over_conv": med["linear"] / med["conv"]}  # fmt: skip
        free_memory()
    return out


def time_projection(b: int, c: int, t: int, rows: int, plan: Plan, device: torch.device) -> dict[str, float]:
    """Median ms of forward + backward of a 1×1 ``conv1d`` and of ``linear`` on the same ``(b, c, t)`` input."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(rows, c, 1, generator=g) / c**0.5).to(device).requires_grad_()
    bias = torch.zeros(rows, device=device, requires_grad=True)
    x = torch.randn(b, c, t, generator=g).to(device).requires_grad_()

    def conv():
        with autocast(device):
            y = F.conv1d(x, w, bias)
        y.float().square().mean().backward()

    def linear():  # the same weights, squeezed: what a Linear with the conv's state-dict entry computes
        with autocast(device):
            y = F.linear(x.transpose(1, 2), w.squeeze(-1), bias).transpose(1, 2)
        y.float().square().mean().backward()

    times = interleaved({"conv": conv, "linear": linear}, device, rounds=max(plan.rounds, 2), iters=plan.iters,
                        warmup=plan.warmup)  # fmt: skip
    return {k: statistics.median(v["wall"]) * 1e3 for k, v in times.items()}


def section_backends(plan: Plan, device: torch.device) -> dict:
    """Ours, SD-1.5 inference, with each SDPA backend of diffusers' dispatcher (``set_attention_backend``)."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    spec = bench_unet.MODELS[plan.sd]
    model = bench_unet.build_ours(spec["unet"], device).eval()
    inputs = bench_unet.make_inputs(spec, spec["batch"], device)
    fwd = bench_unet.forward_fn("ours")
    names = ["native", "_native_flash", "_native_efficient", "_native_cudnn"] if device.type == "cuda" else ["native"]
    active = _AttentionBackendRegistry._active_backend
    out, reference = {}, None
    x, t, _, ctx = inputs

    def run():
        with torch.inference_mode(), autocast(device):
            return fwd(model, x, t, ctx)

    try:
        for name in names:
            try:
                model.set_attention_backend(name)
                got = run().float()
                reference = got if reference is None else reference
                times = interleaved({name: run}, device, rounds=plan.rounds, iters=plan.iters, warmup=plan.warmup)
                out[name] = {
                    **summarize(times[name]["wall"]),
                    "max_abs_diff_vs_native": (got - reference).abs().max().item(),
                }
            except Exception as err:  # a backend this GPU/shape cannot run
                out[name] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    finally:
        model.reset_attention_backend()
        _AttentionBackendRegistry.set_active_backend(active)
    base = out.get("native", {}).get("median_ms")
    for entry in out.values():
        if base and "median_ms" in entry:
            entry["ratio_vs_native"] = entry["median_ms"] / base
    free_memory()
    return out


def section_channels_last(plan: Plan, device: torch.device) -> dict:
    spec = bench_unet.MODELS[plan.celeba]
    ours = bench_unet.build_ours(spec["unet"], device)
    last = copy.deepcopy(ours).to(memory_format=torch.channels_last)
    models = {"ours": ours, "ours_channels_last": last, "diffusers": bench_unet.build_diffusers(ours)}
    inputs = bench_unet.make_inputs(spec, spec["batch"], device)
    report = {"batch": spec["batch"], "contenders": {k: {} for k in models}}
    bench_unet.measure_mode(models, "train", spec["batch"], inputs, timing_args(plan), device, report)
    del models, ours, last
    free_memory()
    return report


#: in order of priority: the issue's figures first, then the evidence for the next optimisations
SECTIONS = {
    "unet": section_unet, "e2e": section_e2e, "ema": section_ema, "sync": section_sync, "compiled": section_compiled,
    "projection": section_projection, "backends": section_backends, "channels_last": section_channels_last,
}  # fmt: skip


# ------------------------------------------------------------------------------------------------ summary
def summary_rows(sections: dict, targets: dict) -> list[dict]:
    """The headline figures: ours, diffusers' own (same run), the ratio, and the issue's target where it has one."""
    rows = []

    def add(what, ours, theirs=None, unit="", better="higher"):
        if ours is None:
            return
        ratio = ours / theirs if theirs else None
        target = targets.get(what)
        met = None if target is None else (ours >= target if better == "higher" else ours <= target)
        rows.append({"figure": what, "ours": ours, "diffusers": theirs, "ratio": ratio, "unit": unit,
                     "target": target, "met": met})  # fmt: skip

    def contender(result, family, name, mode):
        return (((result or {}).get(family) or {}).get("contenders") or {}).get(name, {}).get(mode) or {}

    unet, compiled = sections.get("unet", {}).get("result"), sections.get("compiled", {}).get("result")
    for family in ("celebahq64", "sd15"):
        for mode in ("train", "infer"):
            theirs = contender(unet, family, "diffusers", mode).get("img_per_s")
            add(f"{family} {mode} img/s", contender(unet, family, "ours", mode).get("img_per_s"), theirs, "img/s")
            got = contender(compiled, family, "ours_compiled", mode).get("img_per_s")
            add(f"{family} {mode} img/s (compiled)", got, contender(compiled, family, "diffusers", mode).get(
                "img_per_s"), "img/s")  # fmt: skip
    peak = contender(unet, "sd15", "ours", "train").get("peak_gib_alone_est")
    add("sd15 train peak GiB", peak, contender(unet, "sd15", "diffusers", "train").get("peak_gib_alone_est"), "GiB",
        better="lower")  # fmt: skip
    e2e = (sections.get("e2e", {}).get("result") or {}).get("results") or {}
    if "trainer" in e2e:
        add("e2e celebahq64 img/s", e2e["trainer"]["img_per_s"], e2e.get("diffusers+ema", {}).get("img_per_s"), "img/s")
    ema = (sections.get("ema", {}).get("result") or {}).get("results") or {}
    theirs = ema.get("ema_model_foreach", {}).get("median_ms")
    for key, label in (("ours_exact", "ema 274M ms"), ("ours_lerp", "ema 274M ms (lerp)")):
        if key in ema:
            add(label, ema[key]["median_ms"], theirs, "ms", better="lower")
    sync = sections.get("sync", {}).get("result")
    if sync is not None:
        rows.append({"figure": "no host sync between check points", "ours": sync["ok"], "diffusers": None,
                     "ratio": None, "unit": f"{len(sync['checked_steps'])} steps", "target": True if sync["ok"] is not
                     None else None, "met": sync["ok"]})  # fmt: skip
    return rows


def markdown(report: dict, key: str) -> str:
    m = report["machine"]
    lines = [f"<!-- gpu_suite {key} -->", f"### GPU suite: {m['device_name']}, {m['date'][:10]} (`{key}.json`)", "",
             f"torch {m['torch']}, diffusers {m['diffusers']}; {report['mode']}; "
             f"{report['seconds']:.0f} s in all. Ratios: ours / diffusers' own model (or `EMAModel`) in the same run.",
             ""]  # fmt: skip
    rows = []
    for r in report["summary"]:
        met = "" if r["met"] is None else ("met" if r["met"] else "**missed**")
        rows.append([r["figure"], fmt(r["ours"]), fmt(r["diffusers"]), fmt(r["ratio"]), r["unit"], fmt(r["target"]),
                     met])  # fmt: skip
    lines.append(format_table(["figure", "ours", "diffusers", "ratio", "unit", "target", "status"], rows))
    problems = [f"- `{k}`: {v.get('status')}: {(v.get('error') or '').strip().splitlines()[-1:]}"
                for k, v in report["sections"].items() if v.get("status") != "ok"]  # fmt: skip
    if problems:
        lines += ["", "Sections not completed:", *problems]
    lines.append(f"<!-- /gpu_suite {key} -->")
    return "\n".join(lines) + "\n"


def fmt(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else ("" if value is None else str(value))


def write_markdown(path: Path, block: str, key: str) -> None:
    """Put ``block`` into ``path``: replace the block with the same key, else append; written via a temp file."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    pattern = re.compile(rf"<!-- gpu_suite {re.escape(key)} -->.*?<!-- /gpu_suite {re.escape(key)} -->\n?", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (the test suite runs this)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    p.add_argument("--budget-s", type=float, default=450.0, help="skip sections that would end after this (seconds)")
    p.add_argument("--results-dir", default=str(HERE / "results"), help="where the JSON goes")
    p.add_argument("--results-md", default=str(HERE / "RESULTS.md"), help="the Markdown file that gets the table")
    args = p.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        p.error(f"--sections: unknown {unknown}; expected some of {', '.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.smoke:
        device, plan = torch.device("cpu"), SMOKE
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("gpu_suite: no CUDA device (use --smoke for the CPU check)")
        device, plan = torch.device("cuda"), REAL
    started = time.perf_counter()
    report = {"suite": "gpu_suite", "mode": "smoke (CPU, tiny sizes)" if args.smoke else "bf16 autocast, fp32 "
              "weights, fused AdamW", "machine": machine(device), "sections": {}}  # fmt: skip
    for name in args.sections:
        elapsed = time.perf_counter() - started
        estimate = plan.estimates_s.get(name, 0)
        entry = report["sections"][name] = {}
        if elapsed + estimate > args.budget_s:
            entry.update(status="skipped", error=f"budget: {elapsed:.0f} s used, this section needs ~{estimate} s")
            print(f"[gpu_suite] {name}: skipped ({entry['error']})", flush=True)
            continue
        print(f"[gpu_suite] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            entry["result"] = SECTIONS[name](plan, device)
            entry["status"] = "ok"
        except Exception as err:  # recorded; the other sections still run
            entry.update(status="error", error="".join(traceback.format_exception(err)[-15:]))
            print(entry["error"], file=sys.stderr, flush=True)
        entry["seconds"] = time.perf_counter() - t0
        free_memory()
        print(f"[gpu_suite] {name}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    report["seconds"] = time.perf_counter() - started
    report["summary"] = summary_rows(report["sections"], {} if args.smoke else TARGETS)
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    gpu = re.sub(r"[^a-z0-9]+", "-", report["machine"]["device_name"].lower()).strip("-") or "device"
    key = f"{date}-{gpu}" + ("-smoke" if args.smoke else "")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    tmp = results / f".{key}.json.tmp"
    write_json(str(tmp), report)
    tmp.replace(results / f"{key}.json")
    block = markdown(report, key)
    write_markdown(Path(args.results_md), block, key)
    print(block)
    report["json"] = str(results / f"{key}.json")
    return report


if __name__ == "__main__":
    main()
