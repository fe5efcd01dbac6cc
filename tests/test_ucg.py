"""ucg_training (stablediffusion DDPM.training_step): seeded replacement of batch entries with probability p."""

import math

import numpy as np
import pytest
import torch

from ldm_compat.training.ucg import apply_ucg, check_ucg_training, ucg_mask


def original_training_step_ucg(batch, ucg_training, prng):
    """The loop of stablediffusion ``DDPM.training_step`` (ldm/models/diffusion/ddpm.py), in place, as there."""
    for k in ucg_training:
        p = ucg_training[k]["p"]
        val = ucg_training[k]["val"]
        if val is None:
            val = ""
        for i in range(len(batch[k])):
            if prng.choice(2, p=[1 - p, p]):
                batch[k][i] = val


def _captions(n):
    return [f"caption {i}" for i in range(n)]


def test_random_state_reproduces_the_original_draws():
    config = {"txt": {"p": 0.3, "val": None}, "caption": {"p": 0.7, "val": "<null>"}}
    batch = {"txt": _captions(50), "caption": _captions(50)}
    expected = {k: list(v) for k, v in batch.items()}
    original_training_step_ucg(expected, config, np.random.RandomState(1234))
    ours, masks = apply_ucg(batch, config, np.random.RandomState(1234))
    assert ours["txt"] == expected["txt"] and ours["caption"] == expected["caption"]
    assert batch["txt"] == _captions(50)  # not modified in place
    assert masks["txt"].sum() == sum(v == "" for v in expected["txt"])
    assert "" in ours["txt"] and "<null>" in ours["caption"]  # None means the empty string


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("kind", ["torch", "numpy", "global"])
def test_replacement_frequency_is_p(p, kind):
    n = 20000
    generator = {"torch": torch.Generator().manual_seed(7), "numpy": np.random.default_rng(7), "global": None}[kind]
    _, masks = apply_ucg({"txt": _captions(n)}, {"txt": {"p": p, "val": None}}, generator)
    # binomial: the fraction lies within 5 standard deviations of p
    assert abs(masks["txt"].mean() - p) < 5 * math.sqrt(p * (1 - p) / n)


def test_seeded_generators_repeat_and_differ():
    config = {"txt": {"p": 0.5, "val": None}}
    batch = {"txt": _captions(64)}
    a = apply_ucg(batch, config, torch.Generator().manual_seed(3))[1]["txt"]
    b = apply_ucg(batch, config, torch.Generator().manual_seed(3))[1]["txt"]
    c = apply_ucg(batch, config, torch.Generator().manual_seed(4))[1]["txt"]
    assert (a == b).all() and (a != c).any()
    torch.manual_seed(11)
    d = apply_ucg(batch, config)[1]["txt"]
    torch.manual_seed(11)
    e = apply_ucg(batch, config)[1]["txt"]
    assert (d == e).all()  # the default draws from torch's global generator, which set_seed / save_state cover


def test_p_zero_and_one():
    batch = {"txt": _captions(100)}
    assert apply_ucg(batch, {"txt": {"p": 0, "val": None}})[0]["txt"] == batch["txt"]
    assert apply_ucg(batch, {"txt": {"p": 1.0, "val": "x"}})[0]["txt"] == ["x"] * 100


def test_tensor_labels_are_copied_with_a_numeric_val():
    labels = torch.arange(1000) % 10
    new, masks = apply_ucg(
        {"class_label": labels}, {"class_label": {"p": 0.25, "val": 10}}, torch.Generator().manual_seed(0)
    )
    mask = torch.as_tensor(masks["class_label"])
    assert (new["class_label"][mask] == 10).all() and torch.equal(new["class_label"][~mask], labels[~mask])
    assert 0 < mask.sum() < 1000
    assert torch.equal(labels, torch.arange(1000) % 10)  # the input tensor is untouched
    array = np.arange(8)
    new_array = apply_ucg({"y": array}, {"y": {"p": 1.0, "val": -1}})[0]["y"]
    assert (new_array == -1).all() and (array == np.arange(8)).all()
    with pytest.raises(ValueError, match="ucg_training.class_label.val='': batch"):
        apply_ucg({"class_label": labels}, {"class_label": {"p": 0.5, "val": None}})


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match=r"ucg_training.txt.p=1.5: expected a probability"):
        check_ucg_training({"txt": {"p": 1.5, "val": None}})
    with pytest.raises(ValueError, match="expected a mapping with p"):
        check_ucg_training({"txt": 0.1})
    with pytest.raises(ValueError, match="unknown key"):
        check_ucg_training({"txt": {"p": 0.1, "value": ""}})
    with pytest.raises(ValueError, match="the batch has no key 'txt'"):
        apply_ucg({"image": torch.zeros(2)}, {"txt": {"p": 0.1, "val": None}})
    with pytest.raises(ValueError, match="ucg generator"):
        ucg_mask(3, 0.5, generator=42)
    assert check_ucg_training(None) == {}


def test_processes_drop_their_slice_of_the_global_batch():
    labels = torch.arange(8)
    torch.manual_seed(5)
    _, whole = apply_ucg({"class_label": labels}, {"class_label": {"p": 0.5, "val": -1}})
    halves = []
    for rank in range(2):
        torch.manual_seed(5)
        _, mask = apply_ucg({"class_label": labels[4 * rank : 4 * rank + 4]}, {"class_label": {"p": 0.5, "val": -1}},
                            num_processes=2, process_index=rank)  # fmt: skip
        halves.append(mask["class_label"])
    assert np.array_equal(np.concatenate(halves), whole["class_label"]) and 0 < whole["class_label"].sum() < 8
