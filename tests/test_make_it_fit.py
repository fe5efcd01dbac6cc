"""SD2 make_it_fit: tiling matches the original's element loop; the use-count bug only in bug-compatible mode."""

import pytest
import torch

from ldm_compat.training.init_ckpt import fit_state_dict, fit_tensor


def original_make_it_fit(old, new_shape, counts_start):
    """The stablediffusion ``init_from_ckpt`` loop, element by element (counts start at 1 there)."""
    new = torch.empty(new_shape, dtype=old.dtype)
    if len(new_shape) == 1:
        for i in range(new_shape[0]):
            new[i] = old[i % old.shape[0]]
        return new
    for i in range(new_shape[0]):
        for j in range(new_shape[1]):
            new[i, j] = old[i % old.shape[0], j % old.shape[1]]
    used_old = torch.full((old.shape[1],), float(counts_start))
    for j in range(new_shape[1]):
        used_old[j % old.shape[1]] += 1
    used_new = torch.zeros(new_shape[1])
    for j in range(new_shape[1]):
        used_new[j] = used_old[j % old.shape[1]]
    used_new = used_new[None, :]
    while used_new.ndim < len(new_shape):
        used_new = used_new.unsqueeze(-1)
    return new / used_new


@pytest.mark.parametrize(
    "old_shape, new_shape",
    [((4, 3, 3, 3), (4, 6, 3, 3)), ((4, 3, 3, 3), (6, 5, 3, 3)), ((5,), (8,)), ((6, 4), (3, 4)), ((2, 3), (5, 7))],
)
@pytest.mark.parametrize("bug", [True, False])
def test_fit_matches_original_loop(old_shape, new_shape, bug):
    old = torch.randn(old_shape)
    expected = original_make_it_fit(old, new_shape, counts_start=1 if bug else 0)
    torch.testing.assert_close(fit_tensor(old, torch.Size(new_shape), ldm_bug_compat=bug), expected, rtol=0, atol=0)


def test_documented_bug_ratio():
    # widening the input channels 3 -> 6: the fixed version halves each copy, the original divides by 3
    old = torch.ones(2, 3, 1, 1)
    assert fit_tensor(old, torch.Size((2, 6, 1, 1))).unique().item() == pytest.approx(1 / 2)
    assert fit_tensor(old, torch.Size((2, 6, 1, 1)), ldm_bug_compat=True).unique().item() == pytest.approx(1 / 3)


def test_fit_state_dict_only_touches_mismatches():
    sd = {"a": torch.randn(2, 3), "b": torch.randn(4)}
    out, fitted = fit_state_dict(sd, {"a": (2, 3), "b": (6,), "c": (1,)})
    assert fitted == ["b"] and out["a"] is sd["a"] and out["b"].shape == (6,)


def test_incompatible_rank_is_a_clear_error():
    with pytest.raises(ValueError, match="make_it_fit"):
        fit_tensor(torch.randn(2, 3, 3, 3), torch.Size((2, 3, 5, 5)))
