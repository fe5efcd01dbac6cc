"""A LatentDiffusion run on two processes (``accelerate launch``, CPU, gloo) against one with the same global batch.

The two-process run uses the latent cache (built by the main process, read by both) and ``scale_by_std`` (process
0 computes it from its half of the first batch, as the original's ``rank_zero_only`` hook, and every process takes
that value); the one-process run encodes on the fly and takes the std of the same half. Checked: the same weights —
UNet, trained class embedder, EMA — within 1e-5 (see ``test_reliability_multiprocess`` for why 1e-5 at this
learning rate), the same ``scale_factor`` on both processes and within float32 rounding of the one-process value
(the encoder sees 2 images instead of 4), one cache folder, both processes ending identical.
"""

from __future__ import annotations

import pytest
from helpers.checkpoint_compare import load_any, tensor_max_abs
from helpers.tiny_latent import write_latent_config
from test_reliability_multiprocess import PER_PROCESS, PROCESSES, TOL, launch

from ldm_compat.config import load_ldm_config
from ldm_compat.training.latent_objective import std_scale_factor
from ldm_compat.training.loop import Trainer, TrainOptions

STEPS, EVERY = 4, 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent_mp")
    # ucg_training stays on (p = 0.1 of the labels): its masks are drawn for the global batch too
    config = write_latent_config(root / "latent.yaml", **{"model.base_learning_rate": 1.0e-5})
    cache = root / "cache"
    two, ranks = launch(config, root / "two", "latent", "--latent_cache", str(cache), "--export-original",
                        f"lightning.trainer.max_steps={STEPS}")  # fmt: skip
    trainer = Trainer(
        load_ldm_config(config, [f"data.params.batch_size={PER_PROCESS * PROCESSES}"]),
        TrainOptions(output_dir=str(root / "one"), report_to="none", checkpointing_steps=EVERY),
        source=str(config),
    )
    latent = trainer.latent

    def rescale_by_std(batch, draw=None):  # process 0's half of the global batch, as in the two-process run
        value = std_scale_factor(latent.get_input(batch, draw)[:PER_PROCESS])
        latent.set_scale_factor(value)
        return value

    latent.rescale_by_std = rescale_by_std
    trainer.fit()
    return {"root": root, "two": two, "ranks": ranks, "one": trainer, "cache": cache}


def test_two_processes_match_one_with_the_same_global_batch(runs):
    result, ranks = runs["two"], runs["ranks"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(ranks) == PROCESSES and ranks[0]["num_processes"] == PROCESSES
    assert ranks[0]["final"]["weights"] == ranks[1]["final"]["weights"]
    assert ranks[0]["final"]["ema"] == ranks[1]["final"]["ema"]
    a = runs["root"] / "two" / "checkpoints" / f"checkpoint-{STEPS}"
    b = runs["root"] / "one" / "checkpoints" / f"checkpoint-{STEPS}"
    weights_a, weights_b = load_any(a / "model.safetensors"), load_any(b / "model.safetensors")
    assert any(k.startswith("cond_stage_model.") for k in weights_a)
    worst, where = tensor_max_abs(weights_a, weights_b)
    assert worst <= TOL, where
    ema_a, ema_b = load_any(a / "custom_checkpoint_0.pkl"), load_any(b / "custom_checkpoint_0.pkl")
    shadows = [{str(i): t for i, t in enumerate(e["shadow_params"])} for e in (ema_a, ema_b)]
    worst, where = tensor_max_abs(*shadows)
    assert worst <= TOL, where


def test_scale_by_std_is_process_zeros_value_everywhere(runs):
    folder = runs["root"] / "two" / "checkpoints" / f"checkpoint-{STEPS}"
    # custom_checkpoint_1: the LatentModel state (registered after the EMA)
    scale = load_any(folder / "custom_checkpoint_1.pkl")["scale_factor"]
    one = runs["one"].latent.scale_factor
    assert scale != 1.0 and abs(scale - one) <= 2.4e-7 * abs(one)


def test_the_cache_is_built_once_and_shared(runs):
    folders = [p for p in runs["cache"].iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and (folders[0] / "latent_cache.json").is_file()
    assert not [p for p in runs["cache"].iterdir() if p.name.startswith(".")]  # no temporary build folder left


def test_export_original_from_the_launch_has_the_original_key_list(runs):
    """``--export-original`` through ``accelerate launch``: the LatentDiffusion key list the one-process run's parts
    give, in the original's order (schedule, scale_factor, UNet, EMA, first stage, cond stage)."""
    import torch

    from ldm_compat.convert.training_folder import original_state_dict

    one = runs["one"]
    ckpt = torch.load(runs["root"] / "two" / "original" / "model.ckpt", weights_only=True)
    expected = original_state_dict(one.unet, one.scheduler, one.objective, one.ema, one.latent.original_state_dict())
    assert list(ckpt["state_dict"]) == list(expected) and ckpt["global_step"] == STEPS
    assert (
        ckpt["state_dict"]["scale_factor"].item()
        == load_any(runs["root"] / "two" / "checkpoints" / f"checkpoint-{STEPS}" / "custom_checkpoint_1.pkl")[
            "scale_factor"
        ]
    )
