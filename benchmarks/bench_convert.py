"""Checkpoint conversion at SD size: time and peak RSS of ``original_to_diffusers`` and of the export back.

1. Writes a random-weight original-layout checkpoint ``{'state_dict', 'global_step', 'epoch'}`` (``torch.save``)
   and its YAML: the 12 schedule buffers, the UNet (``model.diffusion_model.*``) and LitEma (``model_ema.*``: one
   shadow per parameter, ``decay``, ``num_updates``), in the original key order. ``--size sd15``: the SD-1.x UNet
   (860M parameters, a 6.9 GB file with its EMA); ``cifar32``/``tiny`` for quick runs.
2. Converts it with ``original_to_diffusers`` in a child process, and exports the folder back with
   ``diffusers_to_original`` in another. Each child reports its wall time (imports excluded) and its peak RSS
   during the call: ``VmHWM`` (reset with ``/proc/self/clear_refs`` after the imports) and the peak anonymous RSS
   (sampled every 10 ms; memory-mapped checkpoint pages are file-backed and reclaimable, anonymous ones are not).
   The ratios divide the peak RSS by the checkpoint's file size (the issue's target: ≤ ~1.2×).
3. Checks the export against the generated checkpoint, key by key and bit for bit, then deletes every file it
   wrote (``--keep`` keeps them). The SD-size run needs ~21 GB of free disk (input, folder, export) and ~7 GB RAM.

``--latent`` makes it a ``LatentDiffusion`` checkpoint in the SD-1.5 layout: the UNet with cross-attention, the
first stage (``first_stage_model.*``, KL-f8 ``AutoencoderKL``: 83M parameters at ``sd15``) and the cond stage
(``cond_stage_model.transformer.text_model.*``, ``FrozenCLIPEmbedder`` with the CLIP ViT-L/14 text tower: 123M, in
the transformers-4.19 layout of real SD checkpoints, ``position_ids`` included); the YAML names a local ``version``
folder the script writes (tokenizer files + the text config), as ``v1-inference.yaml`` names the Hub one. A
``--size sd15 --latent`` checkpoint is 7.7 GB, as ``v1-5-pruned.ckpt``.

Usage::

    python benchmarks/bench_convert.py [--size sd15|cifar32|tiny] [--latent] [--workdir DIR] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import format_table, loadavg, machine, write_json  # noqa: E402

SIZES = ("sd15", "cifar32", "tiny")
#: ``model.params`` of the generated checkpoint's YAML, next to the UNet config (the SD-1.x schedule)
DDPM_PARAMS = {
    "timesteps": 1000, "beta_schedule": "linear", "linear_start": 0.00085, "linear_end": 0.012,
    "parameterization": "eps", "use_ema": True,
}  # fmt: skip
RESULT_PREFIX = "BENCH_CONVERT_RESULT "
#: ``--latent``: the first stage (ddconfig, embed_dim), the CLIP text tower, and what the UNet gains (cross-attention)
LATENT = {
    "sd15": {  # v1-inference.yaml: KL-f8 first stage, openai/clip-vit-large-patch14 text tower
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                     "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0},
        "clip": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
                 "projection_dim": 768},
        "unet": {},  # the sd15 UNet already has its 768-wide cross-attention
    },
    "tiny": {
        "ddconfig": {"double_z": True, "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
                     "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0},
        "clip": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                 "projection_dim": 32},
        "unet": {"in_channels": 4, "out_channels": 4, "use_spatial_transformer": True, "context_dim": 32},
    },
}  # fmt: skip
CLIP_VERSION = "clip_text"  # the local version folder, beside the YAML
TOKENIZER_FILES = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ldm_reference_latent" / "tiny_clip"


def unet_params(size: str, latent: bool = False) -> dict:
    from bench_unet import MODELS

    return {**MODELS[size]["unet"], **(LATENT[size]["unet"] if latent else {})}


def ddpm_config(size: str, latent: bool = False) -> dict:
    params = unet_params(size, latent)
    model = {**DDPM_PARAMS, "image_size": params["image_size"], "channels": params["in_channels"]}
    if params.get("context_dim") is not None:
        model["conditioning_key"] = "crossattn"
    model["unet_config"] = {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": params}
    target = "ldm.models.diffusion.ddpm.DDPM"
    if latent:
        target = "ldm.models.diffusion.ddpm.LatentDiffusion"
        model.update(first_stage_key="jpg", cond_stage_key="txt", scale_factor=0.18215, cond_stage_trainable=False)
        model["first_stage_config"] = {
            "target": "ldm.models.autoencoder.AutoencoderKL",
            "params": {
                "embed_dim": 4,
                "ddconfig": LATENT[size]["ddconfig"],
                "lossconfig": {"target": "torch.nn.Identity"},
            },
        }
        model["cond_stage_config"] = {
            "target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder",
            "params": {"version": CLIP_VERSION},
        }
    return {"model": {"base_learning_rate": 1e-4, "target": target, "params": model}}  # fmt: skip


def _random(shapes: dict, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}


def latent_stage_tensors(size: str, config: dict, workdir: Path, g: torch.Generator) -> dict[str, torch.Tensor]:
    """Random ``first_stage_model.*`` + ``cond_stage_model.*`` in the original layout, and the CLIP version folder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_compat.models.first_stage import build_model, key_map, parse_first_stage_config

    model = build_model(parse_first_stage_config(config["model"]["params"]["first_stage_config"]), device="meta")
    shapes = model.state_dict()
    first = {e.original: (*shapes[e.diffusers].shape, *((1, 1) if e.reshape else ())) for e in key_map(model)}
    text_config = CLIPTextConfig(**LATENT[size]["clip"], max_position_embeddings=77, vocab_size=49408,
                                 hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407)  # fmt: skip
    with torch.device("meta"):
        text = {k.removeprefix("text_model."): v.shape for k, v in CLIPTextModel(text_config).state_dict().items()}
    folder = workdir / CLIP_VERSION
    folder.mkdir()
    text_config.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOKENIZER_FILES / name, folder / name)
    out = {f"first_stage_model.{k}": v for k, v in _random(first, g).items()}
    # transformers 4.19 (what SD checkpoints were saved with): text_model.*, the position_ids buffer first
    prefix = "cond_stage_model.transformer.text_model."
    out[prefix + "embeddings.position_ids"] = torch.arange(77)[None]
    out.update({prefix + k: v for k, v in _random(text, g).items()})
    return out


def generate_checkpoint(size: str, workdir: Path, latent: bool = False) -> tuple[Path, Path]:
    """Write ``model.ckpt`` + ``model.yaml`` (random weights, original key order) and return their paths."""
    import yaml

    from ldm_compat.convert.layout import EMA_PREFIX, UNET_PREFIX, ema_buffer_name
    from ldm_compat.models.unet_ldm import LDMUNetModel
    from ldm_compat.schedulers.scheduling_ldm_ddpm import LDMDDPMScheduler

    if latent and size not in LATENT:
        raise SystemExit(f"--latent: only with --size {' or '.join(LATENT)}")
    config = ddpm_config(size, latent)
    params = config["model"]["params"]
    with torch.device("meta"):  # shapes only; the values are drawn below
        shapes = {k: v.shape for k, v in LDMUNetModel(**params["unet_config"]["params"]).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    state_dict = dict(LDMDDPMScheduler.from_ldm_config(params).ldm_buffers())
    state_dict.update({UNET_PREFIX + k: v for k, v in _random(shapes, g).items()})
    state_dict[EMA_PREFIX + "decay"] = torch.tensor(0.9999, dtype=torch.float32)
    state_dict[EMA_PREFIX + "num_updates"] = torch.tensor(1000, dtype=torch.int)
    state_dict.update({EMA_PREFIX + ema_buffer_name(k): torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()})
    if latent:
        state_dict.update(latent_stage_tensors(size, config, workdir, g))
    ckpt, yaml_path = workdir / "model.ckpt", workdir / "model.yaml"
    torch.save({"state_dict": state_dict, "global_step": 1000, "epoch": 3}, ckpt)
    yaml_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return ckpt, yaml_path


# ------------------------------------------------------------------------------------------------ child side
def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _AnonSampler(threading.Thread):
    """Samples ``RssAnon`` every 10 ms and keeps the peak (there is no kernel high-water mark for it)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_kib = _status_kib("RssAnon") or 0
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.01):
            self.peak_kib = max(self.peak_kib, _status_kib("RssAnon") or 0)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak_kib, _status_kib("RssAnon") or 0)


def child_main(phase: str, src: str, dst: str, config: str | None) -> None:
    """Run one phase in this (child) process and print its figures as one JSON line."""
    # the modules the calls import lazily, imported first so their (one-time) cost is not timed
    import ldm_compat.models.unet_ldm  # noqa: F401
    import ldm_compat.pipelines.pipeline_ldm_compat  # noqa: F401
    import ldm_compat.schedulers.scheduling_ldm_ddpm  # noqa: F401
    from ldm_compat.convert.export import diffusers_to_original
    from ldm_compat.convert.to_diffusers import original_to_diffusers

    baseline_kib = _status_kib("VmRSS")
    try:  # reset VmHWM to the current RSS, so it measures the call and not the imports
        Path("/proc/self/clear_refs").write_text("5")
        hwm_reset = True
    except OSError:
        hwm_reset = False
    sampler = _AnonSampler()
    sampler.start()
    start = time.perf_counter()
    if phase == "convert":
        original_to_diffusers(src, config, dst)
    else:
        diffusers_to_original(src, dst)
    seconds = time.perf_counter() - start
    anon_kib = sampler.stop()
    hwm_kib = _status_kib("VmHWM") if hwm_reset else None
    if hwm_kib is None:  # no /proc: the process's lifetime peak (KiB on Linux)
        hwm_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {"seconds": seconds, "peak_rss_bytes": hwm_kib * 1024, "peak_anon_bytes": anon_kib * 1024,
              "baseline_rss_bytes": (baseline_kib or 0) * 1024, "hwm_reset": hwm_reset}  # fmt: skip
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(phase: str, src: Path, dst: Path, config: Path | None) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--src", str(src), "--dst", str(dst)]
    if config is not None:
        cmd += ["--config", str(config)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{phase} child failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# ------------------------------------------------------------------------------------------------ parent side
def verify_roundtrip(original: Path, exported: Path) -> dict:
    """Compare the two checkpoints bit for bit, tensor by tensor (memory-mapped, so RAM stays small)."""
    a = torch.load(original, map_location="cpu", weights_only=True, mmap=True)
    b = torch.load(exported, map_location="cpu", weights_only=True, mmap=True)
    sa, sb = a.pop("state_dict"), b.pop("state_dict")
    same_order = list(sa) == list(sb)
    differing = [k for k in sa if k not in sb or sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    identical = same_order and not differing and a == b and len(sa) == len(sb)
    return {"keys": len(sa), "same_key_order": same_order, "differing_tensors": len(differing),
            "entries_equal": a == b, "bit_identical": identical}  # fmt: skip


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run(size: str, workdir: Path, verify: bool, latent: bool = False) -> dict:
    t0 = time.perf_counter()
    ckpt, config = generate_checkpoint(size, workdir, latent)
    generate_s = time.perf_counter() - t0
    ckpt_bytes = ckpt.stat().st_size
    folder, exported = workdir / "pipeline", workdir / "export.ckpt"
    convert = run_child("convert", ckpt, folder, config)
    export = run_child("export", folder, exported, None)
    for r in (convert, export):
        r["peak_rss_over_ckpt"] = r["peak_rss_bytes"] / ckpt_bytes
        r["peak_anon_over_ckpt"] = r["peak_anon_bytes"] / ckpt_bytes
        r["rss_increase_over_ckpt"] = (r["peak_rss_bytes"] - r["baseline_rss_bytes"]) / ckpt_bytes
        r["gb_per_s"] = ckpt_bytes / 1e9 / r["seconds"]
    report = {
        "size": size, "latent": latent, "components": sorted(p.name for p in folder.iterdir() if p.is_dir()),
        "ckpt_bytes": ckpt_bytes, "folder_bytes": dir_size(folder),
        "export_bytes": exported.stat().st_size, "generate_seconds": generate_s, "convert": convert, "export": export,
    }  # fmt: skip
    if verify:
        report["roundtrip"] = verify_roundtrip(ckpt, exported)
    return report


def print_report(report: dict) -> None:
    m, r = report["machine"], report["result"]
    gb = 1e9
    size = r["size"] + (" --latent" if r.get("latent") else "")
    print(f"Conversion benchmark, --size {size}, {m['device_name']}, torch {m['torch']}, load average "
          f"{m['loadavg_start']}; checkpoint {r['ckpt_bytes'] / gb:.2f} GB, folder {r['folder_bytes'] / gb:.2f} GB, "
          f"export {r['export_bytes'] / gb:.2f} GB\n")  # fmt: skip
    rows = [[phase, r[phase]["seconds"], r[phase]["gb_per_s"], r[phase]["peak_rss_bytes"] / gb,
             r[phase]["peak_rss_over_ckpt"], r[phase]["peak_anon_bytes"] / gb, r[phase]["peak_anon_over_ckpt"],
             r[phase]["baseline_rss_bytes"] / gb, r[phase]["rss_increase_over_ckpt"]]
            for phase in ("convert", "export")]  # fmt: skip
    print(format_table(["phase", "seconds", "GB/s", "peak RSS GB", "RSS / ckpt", "peak anon GB", "anon / ckpt",
                        "RSS after imports GB", "(peak − imports) / ckpt"], rows))  # fmt: skip
    print(f"folder parts: {', '.join(r.get('components', []))}")
    if "roundtrip" in r:
        rt = r["roundtrip"]
        print(f"\nround trip: {rt['keys']} keys, bit-identical: {rt['bit_identical']} "
              f"(key order {rt['same_key_order']}, {rt['differing_tensors']} differing tensors)")  # fmt: skip


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", choices=SIZES, default="sd15", help="UNet of the generated checkpoint (default sd15)")
    p.add_argument("--latent", action="store_true", help="a LatentDiffusion checkpoint with first and cond stage")
    p.add_argument("--workdir", default=None, help="where the files go (default: a new temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the bit-exact round-trip check")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the report as JSON here")
    p.add_argument("--child", choices=("convert", "export"), help=argparse.SUPPRESS)
    p.add_argument("--src", help=argparse.SUPPRESS)
    p.add_argument("--dst", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if args.child:
        child_main(args.child, args.src, args.dst, args.config)
        return None
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.workdir))
    report = {"benchmark": "convert", "machine": machine(torch.device("cpu"))}
    try:
        report["result"] = run(args.size, workdir, args.verify, args.latent)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    report["loadavg_end"] = loadavg()
    print_report(report)
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
