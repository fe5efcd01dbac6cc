"""Latent folders on the Hub: ``ldm-compat push`` of a converted folder and ``pipe.push_to_hub`` against the local Hub
server (``tests/hub_server.py``), then loading by repo id — ``LDMCompatPipeline.from_pretrained(repo_id)`` and plain
``DiffusionPipeline.from_pretrained(snapshot_download(repo_id))`` (a ``StableDiffusionPipeline``, no flag) — with the
same images, and ``ldm-compat export`` of the downloaded repo giving back the fixture checkpoint bit for bit. The
model card says which pipeline loads the repo and how it is called."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard
from reference_cases import LATENT_FIXTURES, load_latent_case

from ldm_compat.convert.to_diffusers import original_to_diffusers
from ldm_compat.hub import files_to_push, render_model_card

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSS_PROCESS_TOL = 1e-5  # another process may pick other float32 kernels; same numbers otherwise


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_latent")
    return {name: original_to_diffusers(LATENT_FIXTURES / f"{name}.ckpt", LATENT_FIXTURES / f"{name}.yaml", root / name)
            for name in ("sd2_kl_openclip_v", "cin_vq_class")}  # fmt: skip


def test_latent_cards_say_which_pipeline_loads_them(converted):
    card = render_model_card(converted["sd2_kl_openclip_v"], "me/sd2")
    text = card.text
    assert card.data.pipeline_tag == "text-to-image" and "diffusers:StableDiffusionPipeline" in card.data.tags
    assert "| pipeline | `StableDiffusionPipeline` with `LDMUNetModel` and `LDMDDIMScheduler` |" in text
    assert "| cond stage | `FrozenOpenCLIPEmbedder` (`text_encoder/`, `tokenizer/`) |" in text
    assert "`AutoencoderKL` (`vae/`), scaling_factor 0.18215, downsampling ×4" in text
    assert "4 × 8 × 8 (images 32 × 32)" in text and "| conditioning | `crossattn` |" in text
    assert 'snapshot_download("me/sd2"))  # a StableDiffusionPipeline' in text
    assert "images = pipe(prompt, guidance_scale=5.0, num_inference_steps=50).images" in text
    assert "trust_remote_code=True)" not in text and "first_stage_model.*" in text
    card = render_model_card(converted["cin_vq_class"], "me/cin")
    text = card.text
    assert card.data.pipeline_tag is None and "| pipeline | `LDMCompatPipeline`" in text
    assert "class_labels=labels, guidance_scale=3.0" in text and "`ClassEmbedder` (`class_embedder/`)" in text
    assert 'DiffusionPipeline.from_pretrained("me/cin", trust_remote_code=True)' in text


def test_files_to_push_hold_every_component(converted):
    files = files_to_push(converted["sd2_kl_openclip_v"])
    for prefix in ("vae/", "text_encoder/", "tokenizer/", "unet/", "scheduler/", "ldm_extras/"):
        assert any(f.startswith(prefix) for f in files), prefix
    assert not any(f.endswith(".py") for f in files)  # a stock folder: no code
    files = files_to_push(converted["cin_vq_class"])
    assert "ldm_compat_pipeline.py" in files and "class_embedder/ldm_compat_ClassEmbedderModel.py" in files


CLIENT = """
import json, torch
torch.set_num_threads({threads})
from diffusers import DiffusionPipeline
from huggingface_hub import snapshot_download
from ldm_compat.cli import main
from ldm_compat.pipelines import LDMCompatPipeline

work, results = {work!r}, {{}}
results["cli_rc"] = main(["push", {sd2!r}, "alice/sd2", "--token", "hf_fake", "--license", "openrail++"])
pipe = LDMCompatPipeline.from_pretrained({cin!r})
results["push_to_hub"] = str(pipe.push_to_hub("alice/cin", token="hf_fake"))
inputs = torch.load(work + "/inputs.pt")
run = dict(latents=inputs["x_T"], num_inference_steps=4, guidance_scale=3.0, output_type="pt")
for how in ("ldm_compat", "diffusers"):
    loaded = (LDMCompatPipeline.from_pretrained("alice/sd2") if how == "ldm_compat"
              else DiffusionPipeline.from_pretrained(snapshot_download("alice/sd2")))
    loaded.set_progress_bar_config(disable=True)
    results[how] = type(loaded).__name__
    kwargs = dict(prompt=inputs["prompts"]) if how == "ldm_compat" else dict()
    args = () if how == "ldm_compat" else (inputs["prompts"],)
    torch.save(loaded(*args, **kwargs, **run).images, f"{{work}}/sd2_{{how}}.pt")
cin = LDMCompatPipeline.from_pretrained("alice/cin")
cin.set_progress_bar_config(disable=True)
torch.save(cin(class_labels=[1, 2], num_inference_steps=2, output_type="latent",
               generator=torch.Generator().manual_seed(0)).images, work + "/cin.pt")
results["export_rc"] = main(["export", snapshot_download("alice/sd2"), "--output", work + "/back.ckpt"])
print("RESULTS " + json.dumps(results))
"""


def test_push_latent_folders_and_load_them_by_repo_id(converted, tmp_path):
    case = load_latent_case("sd2_kl_openclip_v")
    torch.save({"prompts": case.meta["prompts"], "x_T": case.io["sample.x_T"]}, tmp_path / "inputs.pt")
    with LocalHub() as hub:
        script = CLIENT.format(work=str(tmp_path), threads=torch.get_num_threads(),
                               sd2=str(converted["sd2_kl_openclip_v"]), cin=str(converted["cin_vq_class"]))  # fmt: skip
        result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                                env={**hub.client_env(tmp_path / "hf_home"), "PYTHONPATH": str(REPO_ROOT)},
                                timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-5000:]
        line = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")][-1]
        results = json.loads(line[len("RESULTS ") :])
        sd2_files, cin_files = hub.files("alice/sd2"), hub.files("alice/cin")
    assert results["cli_rc"] == 0 and results["export_rc"] == 0
    assert results["push_to_hub"].startswith(hub.url + "/alice/cin/commit/")
    assert (results["ldm_compat"], results["diffusers"]) == ("LDMCompatPipeline", "StableDiffusionPipeline")
    assert {"vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer.json"} <= set(sd2_files)
    assert {"vqvae/config.json", "class_embedder/config.json", "ldm_compat_pipeline.py"} <= set(cin_files)
    card = ModelCard(sd2_files["README.md"].decode())
    assert card.data.license == "openrail++" and card.data.pipeline_tag == "text-to-image"

    from ldm_compat import LDMCompatPipeline

    pipe = LDMCompatPipeline.from_pretrained(converted["sd2_kl_openclip_v"])
    pipe.set_progress_bar_config(disable=True)
    ours = pipe(prompt=case.meta["prompts"], latents=case.io["sample.x_T"], num_inference_steps=4, guidance_scale=3.0,
                output_type="pt").images  # fmt: skip
    assert (torch.load(tmp_path / "sd2_ldm_compat.pt") - ours).abs().max().item() <= CROSS_PROCESS_TOL
    # the stock pipeline: diffusers' autoencoder arithmetic (see test_pipeline_latent.py)
    assert (torch.load(tmp_path / "sd2_diffusers.pt") - ours).abs().max().item() <= 1e-4
    cin = LDMCompatPipeline.from_pretrained(converted["cin_vq_class"])
    cin.set_progress_bar_config(disable=True)
    expected = cin(class_labels=[1, 2], num_inference_steps=2, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert (torch.load(tmp_path / "cin.pt") - expected).abs().max().item() <= CROSS_PROCESS_TOL
    # everything needed to export travelled with the repo
    original = torch.load(LATENT_FIXTURES / "sd2_kl_openclip_v.ckpt", weights_only=True)["state_dict"]
    back = torch.load(tmp_path / "back.ckpt", weights_only=True)["state_dict"]
    assert list(back) == list(original) and all(torch.equal(back[k], v) for k, v in original.items())
