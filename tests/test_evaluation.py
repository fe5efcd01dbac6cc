"""Offline evaluation: Fréchet distance numerics, the digits classifier, evaluate_samples and `ldm-compat evaluate`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_compat.evaluation import evaluate_samples, frechet_distance, frechet_distance_from_features
from ldm_compat.evaluation.classifier import digits_classifier, real_digits


def _random_covariance(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


def scipy_frechet(mu1, s1, mu2, s2):
    """The usual FID formula with scipy's general matrix square root (pytorch-fid style), as a reference."""
    from scipy import linalg

    covmean = linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def tiny_pixel_pipeline(pipelines):
    """A 4-step 8x8 one-channel pixel pipeline with random weights: enough to exercise sampling and scoring."""
    unet = {
        "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
        "params": dict(image_size=8, in_channels=1, out_channels=1, model_channels=32, attention_resolutions=[],
                       num_res_blocks=1, channel_mult=[1], num_heads=1),
    }  # fmt: skip
    config = {"model": {"params": {"unet_config": unet, "timesteps": 4, "image_size": 8, "channels": 1}}}
    return pipelines.LDMCompatPipeline.from_ldm_config(config)


@pytest.mark.parametrize("d", [1, 5, 64])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _random_covariance(rng, d), _random_covariance(rng, d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(scipy_frechet(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    assert ours == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-12)  # symmetric


def test_frechet_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(1)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0, 3, 16)
    b[:4] = 0.0  # singular: some features never vary
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_of_a_set_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    features = rng.standard_normal((300, 3)) @ rng.standard_normal((3, 32))  # rank 3 of 32
    assert frechet_distance_from_features(features, features) == pytest.approx(0.0, abs=1e-9)
    s = _random_covariance(rng, 8, rank=2)
    assert frechet_distance(np.zeros(8), s, np.zeros(8), s) == pytest.approx(0.0, abs=1e-9)
    with pytest.raises(ValueError, match="expected means"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance_from_features(np.full((3, 2), np.nan), features[:, :2])


# --------------------------------------------------------------------------------------------------------- classifier


@pytest.fixture(scope="module")
def digits():
    images, labels = real_digits()
    classifier = digits_classifier()
    held = torch.as_tensor(classifier.heldout_indices)
    return images, labels, held


def test_classifier_is_accurate_on_held_out_real_digits(digits):
    images, labels, held = digits
    scores = evaluate_samples(images[held], labels[held])
    assert scores["classifier_heldout_accuracy"] > 0.9 and scores["accuracy"] == pytest.approx(
        scores["classifier_heldout_accuracy"], abs=1e-6
    )
    assert scores["confidence"] > 0.9
    assert scores["class_entropy"] > 0.95 * np.log(10)  # every class present, near uniformly
    assert sum(scores["class_histogram"]) == len(held) == scores["num_samples"]


def test_real_digits_score_zero_distance_and_noise_scores_badly(digits):
    images, labels, held = digits
    real_all = evaluate_samples(images)
    assert real_all["frechet_distance"] == pytest.approx(0.0, abs=1e-6)  # the reference statistics themselves
    real = evaluate_samples(images[held])
    noise = evaluate_samples(torch.rand(len(held), 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    blank = evaluate_samples(torch.full((len(held), 1, 8, 8), -1.0) + 1e-3 * torch.randn(len(held), 1, 8, 8))
    for bad in (noise, blank):
        assert bad["frechet_distance"] > 10 * real["frechet_distance"]
        assert bad["classifier_score"] < real["classifier_score"]
    assert noise["confidence"] < real["confidence"]
    assert blank["class_entropy"] < 0.5 * real["class_entropy"]  # one class: mode collapse shows


def test_any_resolution_and_rgb_are_accepted(digits):
    images, _, held = digits
    x = images[held][:64]
    base = evaluate_samples(x)
    upsampled = x.repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)  # 32×32 by pixel repetition
    for other in (upsampled, upsampled.expand(-1, 3, -1, -1), x[:, 0]):
        scores = evaluate_samples(other)
        assert scores["frechet_distance"] == pytest.approx(base["frechet_distance"], rel=1e-5)
        assert scores["class_histogram"] == base["class_histogram"]
    with pytest.raises(ValueError, match="expected \\(b, 1 or 3, h, w\\)"):
        evaluate_samples(torch.zeros(4, 2, 8, 8))
    with pytest.raises(ValueError, match="at least 2"):
        evaluate_samples(x[:1])
    with pytest.raises(ValueError, match="labels: expected 64"):
        evaluate_samples(x, torch.zeros(3))


def test_classifier_training_is_deterministic_and_leaves_the_global_rng_alone():
    first = digits_classifier()
    digits_classifier.cache_clear()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    second = digits_classifier()
    assert torch.equal(torch.rand(3), expected)
    for a, b in zip(first.body.parameters(), second.body.parameters()):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------------------- command


def _write_pngs(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        pixels = ((image[0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png")


def test_evaluate_command_on_an_image_folder(tmp_path, digits, capsys):
    from ldm_compat.cli import main

    images, _, held = digits
    _write_pngs(tmp_path / "samples", images[held][:40])
    out = tmp_path / "scores.json"
    assert main(["evaluate", str(tmp_path / "samples"), "--num-samples", "32", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    from_pngs = ((images[held][:32] + 1) * 127.5).round() / 127.5 - 1  # what the 8-bit files hold
    expected = evaluate_samples(from_pngs)
    assert report["scores"]["num_samples"] == 32
    assert report["scores"]["frechet_distance"] == pytest.approx(expected["frechet_distance"], rel=1e-6)
    assert report["real_digits_reference"]["num_samples"] == 32
    assert "frechet_distance" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    assert "no pipeline (model_index.json) and no image files" in capsys.readouterr().err


def test_evaluate_command_samples_a_pipeline_folder(tmp_path, capsys):
    pipelines = pytest.importorskip("ldm_compat.pipelines.pipeline_ldm_compat")
    from ldm_compat.cli import main

    tiny_pixel_pipeline(pipelines).save_pretrained(tmp_path / "pipe")
    out = tmp_path / "scores.json"
    assert (
        main(["evaluate", str(tmp_path / "pipe"), "--num-samples", "6", "--batch-size", "4", "--output", str(out)]) == 0
    )
    scores = json.loads(out.read_text())["scores"]
    assert scores["num_samples"] == 6 and np.isfinite(scores["frechet_distance"])
    assert "sampling 6 images" in capsys.readouterr().out


def test_sample_pipeline_progress_bars_change_nothing_but_the_output(tmp_path, capsys, monkeypatch):
    pipelines = pytest.importorskip("ldm_compat.pipelines.pipeline_ldm_compat")
    from ldm_compat.evaluation.evaluate import sample_pipeline

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    tiny_pixel_pipeline(pipelines).save_pretrained(tmp_path / "pipe")
    capsys.readouterr()
    quiet, _ = sample_pipeline(str(tmp_path / "pipe"), 6, batch_size=4, device="cpu")
    assert "sampling batch" not in capsys.readouterr().err
    shown, _ = sample_pipeline(str(tmp_path / "pipe"), 6, batch_size=4, device="cpu", progress=True)
    err = capsys.readouterr().err
    assert "sampling batch 1/2" in err and "sampling batch 2/2" in err and "4/4" in err  # T = 4 steps per batch
    assert torch.equal(quiet, shown)
