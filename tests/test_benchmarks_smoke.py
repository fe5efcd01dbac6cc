"""The benchmark scripts in their smallest modes, so they never rot: correctness of what they report, no timings."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_convert  # noqa: E402
import bench_train  # noqa: E402
import bench_unet  # noqa: E402
from reference_cases import load_layout  # noqa: E402

QUICK = ["--rounds", "1", "--iters", "1", "--warmup", "0", "--threads", "1"]


def test_unet_tiny_reports_every_contender_and_mode(tmp_path):
    out = tmp_path / "unet.json"
    report = bench_unet.main(["--models", "tiny", *QUICK, "--json", str(out)])
    assert json.loads(out.read_text())["models"].keys() == {"tiny"}
    contenders = report["models"]["tiny"]["contenders"]
    assert set(contenders) == {"ours", "diffusers"}
    assert contenders["ours"]["parameters"] == contenders["diffusers"]["parameters"]
    # the diffusers UNet holds our weights and computes the same function (fp32, fixture tolerance)
    assert contenders["ours"]["max_abs_diff_vs_ours_fp32"] == 0.0
    assert contenders["diffusers"]["max_abs_diff_vs_ours_fp32"] <= 1e-5
    for mode in ("train", "infer"):
        assert contenders["diffusers"][mode]["ratio_vs_diffusers"] == 1.0
        for entry in (contenders["ours"][mode], contenders["diffusers"][mode]):
            assert entry["wall"]["n"] == 1 and entry["img_per_s"] > 0
    assert report["targets"] == []  # the CPU target is for cpu_small only


def test_unet_models_match_diffusers_and_the_published_layout():
    counts = bench_unet.count_only(list(bench_unet.MODELS), None)
    for name, row in counts.items():
        assert row["ours"] == row["diffusers"], name
    assert counts["sd15"]["diffusers_class"] == "UNet2DConditionModel"
    layout = load_layout("celebahq-ldm-vq-4")
    assert bench_unet.MODELS["celebahq64"]["unet"] == layout["unet_config_params"]
    assert counts["celebahq64"]["ours"] == layout["num_parameters"]
    assert round(counts["cifar32"]["ours"] / 1e6, 1) == 35.7  # the figure for the DDPM CIFAR-10 UNet


def test_unet_original_repo_is_imported_from_the_given_path(tmp_path, monkeypatch):
    # a stand-in checkout whose UNetModel has the original's calling convention and our weights' keys
    module = tmp_path / "repo" / "ldm" / "modules" / "diffusionmodules"
    module.mkdir(parents=True)
    (module / "openaimodel.py").write_text(
        "from ldm_compat.models.unet_ldm import LDMUNetModel\n\n"
        "class UNetModel(LDMUNetModel):\n"
        "    def forward(self, x, timesteps=None, context=None, y=None):\n"
        "        return super().forward(x, timesteps, encoder_hidden_states=context, class_labels=y).sample\n"
    )
    monkeypatch.setattr(sys, "path", list(sys.path))
    try:
        report = bench_unet.main(["--models", "tiny", "--modes", "infer", *QUICK, "--original-repo",
                                  str(tmp_path / "repo")])  # fmt: skip
    finally:
        for name in [n for n in sys.modules if n == "ldm" or n.startswith("ldm.")]:
            del sys.modules[name]
    original = report["models"]["tiny"]["contenders"]["original"]
    assert original["class"] == "UNetModel" and original["max_abs_diff_vs_ours_fp32"] == 0.0
    assert original["infer"]["wall"]["n"] == 1
    with pytest.raises(SystemExit, match="--original-repo"):
        bench_unet.main(["--models", "tiny", *QUICK, "--original-repo", str(tmp_path)])


def test_unet_rejects_unknown_models(capsys):
    with pytest.raises(SystemExit):
        bench_unet.main(["--models", "nope"])
    assert "--models" in capsys.readouterr().err


def test_convert_tiny_round_trip_and_cleanup(tmp_path):
    out = tmp_path / "convert.json"
    report = bench_convert.main(["--size", "tiny", "--workdir", str(tmp_path / "work"), "--json", str(out)])
    result = json.loads(out.read_text())["result"]
    assert result == json.loads(json.dumps(report["result"]))
    assert result["roundtrip"]["bit_identical"] and result["roundtrip"]["differing_tensors"] == 0
    # schedule buffers + UNet + one EMA shadow per parameter + decay/num_updates
    unet_keys = len(tiny_unet_keys())
    assert result["roundtrip"]["keys"] == 12 + 2 * unet_keys + 2
    for phase in ("convert", "export"):
        assert result[phase]["seconds"] > 0
        assert result[phase]["peak_rss_bytes"] >= result[phase]["peak_anon_bytes"] > 0
    assert list((tmp_path / "work").iterdir()) == []  # every generated file removed


def test_convert_tiny_latent_round_trip(tmp_path):
    report = bench_convert.main(["--size", "tiny", "--latent", "--workdir", str(tmp_path / "work")])
    result = report["result"]
    assert result["roundtrip"]["bit_identical"] and result["latent"]
    assert "vae" in result["components"]  # the first stage became a stock AutoencoderKL


def tiny_unet_keys():
    from ldm_compat.models.unet_ldm import LDMUNetModel

    with torch.device("meta"):
        return LDMUNetModel(**bench_unet.MODELS["tiny"]["unet"]).state_dict()


def test_train_tiny_times_each_contender(tmp_path):
    out = tmp_path / "train.json"
    report = bench_train.main(["--model", "tiny", "--rounds", "2", "--iters", "1", "--warmup", "1", "--threads", "1",
                               "--timesteps", "10", "--json", str(out)])  # fmt: skip
    results = report["result"]["results"]
    assert set(results) == {"trainer", "plain", "plain+ema"}
    assert all(r["wall"]["n"] == 2 and r["img_per_s"] > 0 for r in results.values())
    assert results["plain"]["ratio_vs_plain"] == 1.0
    assert json.loads(out.read_text())["result"]["batch"] == 4


def test_train_latent_times_with_and_without_the_cache(tmp_path):
    report = bench_train.main(["--latent", "digits", "--batch", "4", "--rounds", "1", "--iters", "2", "--warmup", "0",
                               "--threads", "1", "--timesteps", "10", "--json", str(tmp_path / "l.json")])  # fmt: skip
    results = report["result"]["results"]
    assert set(results) == {"on-the-fly", "cached"}
    assert all(r["wall"]["n"] == 2 and r["img_per_s"] > 0 for r in results.values())
    assert results["cached"]["speedup_vs_on_the_fly"] > 0 and report["result"]["cache_build_s"] > 0


def test_gpu_suite_smoke_runs_every_section_and_writes_json_and_table(tmp_path):
    import gpu_suite

    md = tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nearlier text\n")
    args = ["--smoke", "--results-dir", str(tmp_path / "results"), "--results-md", str(md)]
    report = gpu_suite.main(args)
    sections = report["sections"]
    assert list(sections) == list(gpu_suite.SECTIONS)
    assert {k: v["status"] for k, v in sections.items()} == dict.fromkeys(gpu_suite.SECTIONS, "ok"), {
        k: v.get("error") for k, v in sections.items()
    }
    saved = json.loads(Path(report["json"]).read_text())
    assert saved["machine"]["torch"] == torch.__version__ and saved["machine"]["diffusers"]
    # every figure is a ratio against diffusers' own model (or EMAModel) measured in the same run
    figures = {row["figure"]: row for row in saved["summary"]}
    for name in ("celebahq64 train img/s", "sd15 infer img/s", "e2e celebahq64 img/s", "ema 274M ms",
                 "celebahq64 infer img/s (compiled)"):  # fmt: skip
        assert figures[name]["ours"] > 0 and figures[name]["diffusers"] > 0 and figures[name]["ratio"] > 0, name
    assert figures["no host sync between check points"]["met"] is None  # nothing to check on the CPU
    unet = sections["unet"]["result"]
    assert unet["sd15"]["contenders"]["diffusers"]["class"] == "UNet2DConditionModel"
    assert unet["celebahq64"]["contenders"]["diffusers"]["class"] == "UNet2DModel"
    assert unet["sd15"]["contenders"]["diffusers"]["max_abs_diff_vs_ours_fp32"] <= 1e-5
    assert sections["ema"]["result"]["half_params"]["ours_shadow_dtypes"] == ["torch.float32"]
    assert sections["compiled"]["result"]["celebahq64"]["fullgraph"] is True
    assert all(v["linear_over_conv"] > 0 for v in sections["projection"]["result"].values())
    # the table went in after the existing text; a second run of the same name replaces it
    text = md.read_text()
    assert text.startswith("# Results\n\nearlier text\n") and text.count("<!-- gpu_suite ") == 1
    assert "| e2e celebahq64 img/s |" in text
    gpu_suite.write_markdown(md, gpu_suite.markdown(saved, Path(report["json"]).stem), Path(report["json"]).stem)
    assert md.read_text() == text
