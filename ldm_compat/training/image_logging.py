"""The original ``DDPM.log_images`` + ``ImageLogger`` callback: ``inputs``, ``diffusion_row``, ``samples``,
``denoise_row`` as PNG grids (and to the tracker), without torchvision.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image


def make_grid(images: torch.Tensor, nrow: int = 8, padding: int = 2, pad_value: float = 0.0) -> torch.Tensor:
    """``(n, c, h, w)`` → one ``(c, H, W)`` grid, ``nrow`` images per row (torchvision ``make_grid`` layout)."""
    if images.ndim == 3:
        return images
    n, c, h, w = images.shape
    if c == 1:
        images = images.expand(n, 3, h, w)  # torchvision makes single-channel grids RGB
        c = 3
    cols = min(nrow, n)
    rows = math.ceil(n / cols)
    grid = images.new_full((c, rows * (h + padding) + padding, cols * (w + padding) + padding), pad_value)
    for index in range(n):
        r, col = divmod(index, cols)
        top, left = r * (h + padding) + padding, col * (w + padding) + padding
        grid[:, top : top + h, left : left + w] = images[index]
    return grid


def rows_from_list(steps: Sequence[torch.Tensor]) -> torch.Tensor:
    """The original ``_get_rows_from_list``: one row per batch element, one column per step."""
    stacked = torch.stack(list(steps), dim=1)  # b n c h w
    b, n = stacked.shape[:2]
    return make_grid(stacked.reshape(b * n, *stacked.shape[2:]), nrow=n)


def to_uint8_image(grid: torch.Tensor, clamp: bool = True) -> np.ndarray:
    """A ``(c, H, W)`` grid in [-1, 1] → ``H W c`` uint8, as the ImageLogger's ``(x + 1) / 2 * 255``."""
    if clamp:
        grid = grid.clamp(-1.0, 1.0)
    array = ((grid.float().cpu() + 1.0) / 2.0).permute(1, 2, 0).numpy()
    return (array * 255).astype(np.uint8)


def save_grid(grid: torch.Tensor, path: str | os.PathLike) -> None:
    array = to_uint8_image(grid)
    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


@torch.no_grad()
def log_images(
    x: torch.Tensor,
    q_sample: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    num_timesteps: int,
    log_every_t: int,
    sample: Callable[[int], tuple[torch.Tensor, list[torch.Tensor]]] | None = None,
    n: int = 8,
    n_row: int = 2,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """The original ``DDPM.log_images``: ``sample(batch_size)`` returns ``(samples, intermediates)`` (EMA weights).

    Noise comes from ``generator`` (the training RNG is left untouched, so logging never changes a run).
    """
    n = min(x.shape[0], n)
    n_row = min(x.shape[0], n_row)
    log = {"inputs": x[:n]}
    x_start = x[:n_row]
    row = []
    for t in range(num_timesteps):
        if t % log_every_t == 0 or t == num_timesteps - 1:
            timesteps = torch.full((n_row,), t, device=x.device, dtype=torch.long)
            noise = torch.randn(x_start.shape, generator=generator, device="cpu").to(x.device, x.dtype)
            row.append(q_sample(x_start, timesteps, noise))
    log["diffusion_row"] = rows_from_list(row)
    if sample is not None:
        samples, intermediates = sample(n)
        log["samples"] = samples
        log["denoise_row"] = rows_from_list(intermediates)
    return log


def write_image_log(
    log: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    split: str,
    global_step: int,
    epoch: int,
    batch_idx: int,
    max_images: int = 4,
    tracker=None,
) -> list[str]:
    """ImageLogger: ``<folder>/images/<split>/<key>_gs-XXXXXX_e-XXXXXX_b-XXXXXX.png`` (+ tracker images)."""
    written = []
    for key, images in log.items():
        if images.ndim == 4:
            images = images[:max_images]
        grid = make_grid(images.float().cpu().clamp(-1.0, 1.0), nrow=4)
        path = os.path.join(folder, "images", split, f"{key}_gs-{global_step:06}_e-{epoch:06}_b-{batch_idx:06}.png")
        save_grid(grid, path)
        written.append(path)
        if tracker is not None and hasattr(tracker, "writer"):
            tracker.writer.add_image(f"{split}/{key}", (grid.clamp(-1, 1) + 1) / 2, global_step)
    return written
