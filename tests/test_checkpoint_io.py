"""Safe checkpoint reading and atomic writing."""

import os
import pickle

import pytest
import torch
from reference_cases import FIXTURES

from ldm_compat.convert.checkpoint_io import CheckpointError, load_checkpoint, save_checkpoint, state_dict_of
from ldm_compat.convert.layout import OriginalStateDict

CKPT = FIXTURES / "ddpm_eps_linear.ckpt"


class _Canary:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))  # creates the canary file if unpickled with code execution


def test_loads_original_checkpoint():
    ckpt = load_checkpoint(CKPT)
    assert ckpt["global_step"] == torch.load(CKPT, weights_only=True)["global_step"]
    sd = state_dict_of(ckpt)
    assert "betas" in sd and any(k.startswith("model.diffusion_model.") for k in sd)


def test_unsafe_pickle_is_refused_and_never_executed(tmp_path):
    canary = tmp_path / "canary"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Canary(str(canary))}, evil)
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(evil)
    assert not canary.exists()
    # the payload really does execute when unpickled without protection: the canary works
    with open(evil, "rb"):
        torch.load(evil, weights_only=False)
    assert canary.exists()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(CKPT.read_bytes()[: CKPT.stat().st_size // 2]), "truncated"),
        (lambda p: p.write_text("not a checkpoint"), "not a PyTorch checkpoint"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: torch.save([1, 2, 3], p), "expected a state dict"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, make, match):
    path = tmp_path / "bad.ckpt"
    make(path)
    with pytest.raises(CheckpointError, match=match) as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_bad_safetensors(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_save_round_trip_and_no_temp_left(tmp_path, suffix):
    sd = state_dict_of(load_checkpoint(CKPT))
    path = tmp_path / f"out{suffix}"
    save_checkpoint({"state_dict": sd, "global_step": 7}, path)
    back = state_dict_of(load_checkpoint(path))
    assert list(back) == list(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    assert os.listdir(tmp_path) == [path.name]


def test_failed_write_leaves_old_file(tmp_path):
    path = tmp_path / "out.ckpt"
    save_checkpoint({"state_dict": {"a": torch.ones(2)}}, path)

    class Boom:
        def __reduce__(self):
            raise pickle.PicklingError("boom")

    with pytest.raises(pickle.PicklingError):
        save_checkpoint({"state_dict": {"a": torch.zeros(2)}, "x": Boom()}, path)
    assert torch.equal(load_checkpoint(path)["state_dict"]["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["out.ckpt"]


def test_layout_split_join_is_lossless_and_ordered():
    sd = state_dict_of(load_checkpoint(CKPT))
    parts = OriginalStateDict.split(sd)
    assert parts.unet and parts.ema and len(parts.schedule) == 12 and not parts.other
    joined = parts.join()
    assert list(joined) == list(sd)
    assert all(joined[k] is sd[k] for k in sd)
