"""Push → download round trip against a local Hub API server (``tests/hub_server.py``), with the real
``huggingface_hub`` / diffusers client code: ``pipe.push_to_hub``, ``ldm-compat push DIR REPO_ID``,
``LDMCompatPipeline.from_pretrained(repo_id)`` and plain diffusers — ``DiffusionPipeline.from_pretrained(
snapshot_download(repo_id))`` with no flag for a stock (unconditional) repo, ``DiffusionPipeline.from_pretrained(
repo_id, trust_remote_code=True)`` for the others — identical samples with a fixed generator.

The client runs in a fresh interpreter because ``huggingface_hub`` binds ``HF_ENDPOINT`` when it is imported.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from hub_server import LocalHub
from huggingface_hub import ModelCard
from reference_cases import case_pipeline, load_case

from ldm_compat.hub import write_card_extras

REPO_ROOT = Path(__file__).resolve().parents[1]
CROSS_PROCESS_TOL = 1e-5  # another process may pick other float32 kernels (1 ulp seen); same numbers otherwise

CLIENT = """
import json, sys, torch
torch.set_num_threads({threads})
from diffusers import DiffusionPipeline
from huggingface_hub import HfApi, snapshot_download

work = {work!r}
results = {{}}

# 1. pipe.push_to_hub: a fixture pipeline loaded from a local folder, pushed with card inputs
from ldm_compat.pipelines import LDMCompatPipeline
from PIL import Image
pipe = LDMCompatPipeline.from_pretrained(work + "/uncond")
samples = [Image.new("RGB", (16, 16), (40 * i, 0, 0)) for i in range(3)]
info = pipe.push_to_hub("alice/uncond", token="hf_fake", license="mit", samples=samples,
                        training={{"steps": 1234, "data": "digits", "hardware": "2 CPU cores", "ema": "LitEma 0.9999"}})
results["push_to_hub"] = str(info)

# 1b. save_pretrained(push_to_hub=True): save, then push the saved folder
pipe.save_pretrained(work + "/saved", push_to_hub=True, repo_id="alice/saved", token="hf_fake")

# 2. the CLI on a training output folder (checkpoints and logs must stay behind)
from ldm_compat.cli import main
rc = main(["push", work + "/train_out", "alice/cond", "--token", "hf_fake", "--license", "openrail",
           "--training", json.dumps({{"steps": 77}}), "--message", "first upload"])
results["cli_rc"] = rc

# 3. download by repo id and sample
gen = lambda: torch.Generator().manual_seed(0)
context = torch.load(work + "/context.pt")
for repo, kwargs in (("alice/uncond", {{}}), ("alice/cond", {{"encoder_hidden_states": context}})):
    for how in ("ldm_compat", "diffusers"):
        if how == "ldm_compat":
            loaded = LDMCompatPipeline.from_pretrained(repo)
        elif repo == "alice/uncond":  # a stock DDPMPipeline repo, no code in it: no flag
            loaded = DiffusionPipeline.from_pretrained(snapshot_download(repo))
        else:
            loaded = DiffusionPipeline.from_pretrained(repo, trust_remote_code=True)
        loaded.set_progress_bar_config(disable=True)
        results[f"{{repo}} {{how}}"] = type(loaded).__name__
        name = repo.split("/")[1]
        if type(loaded).__name__ == "DDPMPipeline":
            images = loaded(batch_size=2, generator=gen(), num_inference_steps=10, output_type="pt").images
        else:
            images = loaded(batch_size=2, generator=gen(), num_inference_steps=10, output_type="pt", **kwargs).images
        torch.save(images, f"{{work}}/{{name}}_{{how}}.pt")

# 4. without the flag, plain diffusers refuses to run the loader files
try:
    DiffusionPipeline.from_pretrained("alice/cond")
except ValueError as err:
    results["no_flag"] = "trust_remote_code" in str(err)
# 5. diffusers' own download refuses components of other libraries (huggingface/diffusers#5553)
try:
    DiffusionPipeline.from_pretrained("alice/uncond")
except ValueError as err:
    results["stock_by_repo_id"] = "/ldm_compat.py as defined in `model_index.json` does not exist" in str(err)

print("RESULTS " + json.dumps(results))
"""


def test_push_and_load_by_repo_id(tmp_path):
    uncond, cond = case_pipeline("ddpm_eps_linear"), case_pipeline("ddpm_v_sqrtlinear_crossattn")
    uncond.save_pretrained(tmp_path / "uncond")
    # a training output folder: the pipeline plus what must not be pushed
    train_out = tmp_path / "train_out"
    cond.save_pretrained(train_out)
    case = load_case("ddpm_v_sqrtlinear_crossattn")
    write_card_extras(train_out, training={"data": "random"}, original_config=case.config)
    (train_out / "checkpoint-10").mkdir()
    (train_out / "checkpoint-10" / "optimizer.bin").write_bytes(b"\0" * 16)
    (train_out / "logs").mkdir()
    (train_out / "logs" / "events.out").write_text("x")
    (train_out / "last.ckpt").write_bytes(b"\0" * 16)
    context = case.io["context"]
    torch.save(context, tmp_path / "context.pt")

    with LocalHub() as hub:
        script = CLIENT.format(work=str(tmp_path), threads=torch.get_num_threads())
        result = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(script)],
            env={**hub.client_env(tmp_path / "hf_home"), "PYTHONPATH": str(REPO_ROOT)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-5000:]
        line = [x for x in result.stdout.splitlines() if x.startswith("RESULTS ")][-1]
        results = json.loads(line[len("RESULTS ") :])
        uncond_files, cond_files = hub.files("alice/uncond"), hub.files("alice/cond")
        cond_messages = hub.commit_messages("alice/cond")
        saved_files = hub.files("alice/saved")
        requests = list(hub.requests)

    assert results["push_to_hub"].startswith(hub.url + "/alice/uncond/commit/")
    assert results["cli_rc"] == 0 and results["no_flag"] is True and results["stock_by_repo_id"] is True
    assert results["alice/uncond ldm_compat"] == "LDMCompatPipeline"
    assert results["alice/uncond diffusers"] == "DDPMPipeline"
    assert results["alice/cond ldm_compat"] == results["alice/cond diffusers"] == "LDMCompatPipeline"
    assert cond_messages == ["first upload"]
    assert ("POST", "/api/repos/create") in requests

    # what was uploaded: the pipeline, its loader files (none for a stock repo), extras and card; no training state
    assert sorted(uncond_files) == [
        "README.md",
        "ldm_extras/training.json",
        "model_index.json",
        "sample_grid.png",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
    ]
    assert sorted(cond_files) == [
        "README.md",
        "ldm_compat_pipeline.py",
        "ldm_extras/config.yaml",
        "ldm_extras/training.json",
        "model_index.json",
        "scheduler/ldm_compat_LDMDDPMScheduler.py",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors",
        "unet/ldm_compat_LDMUNetModel.py",
    ]
    assert sorted(saved_files) == sorted(set(uncond_files) - {"ldm_extras/training.json", "sample_grid.png"})
    assert (
        uncond_files["unet/diffusion_pytorch_model.safetensors"]
        == (tmp_path / "uncond/unet/diffusion_pytorch_model.safetensors").read_bytes()
    )

    # the cards
    card = ModelCard(uncond_files["README.md"].decode())
    assert card.data.license == "mit" and card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert "ldm_compat" in card.data.tags
    for text in ("alice/uncond", "1234", "digits", "2 CPU cores", "LitEma 0.9999", "![samples](sample_grid.png)"):
        assert text in card.text, text
    card = ModelCard(cond_files["README.md"].decode())
    assert card.data.license == "openrail" and card.data.pipeline_tag is None
    for text in ("`crossattn`", "`encoder_hidden_states` of width 24", "| steps | 77 |", "| data | random |"):
        assert text in card.text, text
    assert "sqrt_linear" in card.text and "## Original config" in card.text

    # samples from the downloaded pipelines equal those of the pipelines that were pushed
    gen = torch.Generator().manual_seed(0)
    ours = uncond(batch_size=2, generator=gen, num_inference_steps=10, output_type="pt").images
    for how in ("ldm_compat", "diffusers"):
        theirs = torch.load(tmp_path / f"uncond_{how}.pt")
        assert (theirs - ours).abs().max().item() <= CROSS_PROCESS_TOL, how
    gen = torch.Generator().manual_seed(0)
    ours = cond(batch_size=2, generator=gen, num_inference_steps=10, output_type="pt", encoder_hidden_states=context)
    for how in ("ldm_compat", "diffusers"):
        theirs = torch.load(tmp_path / f"cond_{how}.pt")
        assert (theirs - ours.images).abs().max().item() <= CROSS_PROCESS_TOL, how
