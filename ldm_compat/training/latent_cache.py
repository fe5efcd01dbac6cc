"""Opt-in cache of a LatentDiffusion run's first-stage encodings (and text encodings), built with HF ``datasets``.

``--latent_cache DIR`` (``TrainOptions.latent_cache``): the training set is encoded once and stored under
``DIR/<fingerprint>/`` (``datasets.Dataset.save_to_disk``), then read back by every later run and process whose
fingerprint agrees (the data set and its rows, the image transform, the first-stage config and weights, the cond
stage's config and weights when text encodings are cached). The main process builds it (written into a temporary
folder and renamed, so a killed build is never reused); the others wait and read it.

What is stored, and why it stays exact:

- the first stage's **moments**, not latents. KL: the encoder's ``quant_conv`` output (mean and log-variance), so
  every step still draws the posterior sample ``mean + std · eps`` with the same ``eps`` from the same generator as
  without the cache — the random stream of a cached run is the uncached run's. (Caching the sampled latent would
  freeze one sample per image: a different training objective.) VQ: ``quant_conv(encoder(x))`` before quantization,
  which is what ``get_first_stage_encoding`` uses anyway. With ``flip_p > 0`` the mirrored image is encoded too and
  each step picks the variant the data set's seeded flip chooses.
- the cond stage's output for a text ``cond_stage_key`` when the cond stage is frozen, with the text it encodes;
  a step whose text changed (``ucg_training``) encodes those rows again, so the dropout behaves as without cache.

The encodings equal on-the-fly encoding up to float32 rounding: the encoder is run on other batches than training
sees, and CPU/GPU kernels round differently for different batch sizes (measured on the digits config: at most 7e-7
on the moments). Everything else — the posterior noise, ``t``, the loss noise, ``scale_by_std``'s draw — is the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from torch.utils.data import Dataset

from ldm_compat.training.latent_model import CACHED_COND, CACHED_COND_TEXT, CACHED_MOMENTS
from ldm_compat.training.latent_objective import RAW_COND_KEYS

logger = logging.getLogger(__name__)

FORMAT = "ldm_compat.latent_cache/1"
INFO_FILE = "latent_cache.json"
ENCODE_BATCH = 64
IN_MEMORY_BYTES = 1 << 30  # columns up to this size are read into memory once (per-row Arrow access is slow)


def _digest_tensors(hasher, tensors) -> None:
    for name, tensor in tensors:
        t = tensor.detach().cpu().contiguous()
        hasher.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        hasher.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def caches_text(latent) -> bool:
    """Text encodings are cached for a frozen cond stage fed a text key (``caption``, ``txt``, …)."""
    o = latent.options
    return (o.conditioning_key is not None and latent.cond_stage is not None and not o.cond_stage_trainable
            and o.cond_stage_key in RAW_COND_KEYS)  # fmt: skip


def fingerprint(base, latent) -> str:
    """What the cached values depend on, hashed: data rows and transform, first stage (and cond stage)."""
    h = hashlib.sha256(FORMAT.encode())
    facts = {
        "data": getattr(base.hf, "_fingerprint", None), "rows": len(base.rows), "image_key": base.image_key,
        "image_size": base.image_size, "interpolation": base.interpolation, "mode": base.mode,
        "value_range": list(base.value_range), "flips": base.flip_p > 0,
        "first_stage": latent.options.first_stage_config,
    }  # fmt: skip
    if caches_text(latent):
        facts.update(cond_stage=latent.options.cond_stage_config, cond_stage_key=latent.options.cond_stage_key)
    h.update(json.dumps(facts, sort_keys=True, default=str).encode())
    h.update(np.asarray(base.rows, dtype=np.int64).tobytes())
    _digest_tensors(h, latent.first_stage.model.state_dict().items())
    if caches_text(latent):
        for name, module in sorted(latent.cond_stage.modules().items()):
            _digest_tensors(h, ((f"{name}.{k}", v) for k, v in module.state_dict().items()))
    return h.hexdigest()[:24]


@torch.no_grad()
def _encode(latent, arrays: list[np.ndarray]) -> np.ndarray:
    """``h w c`` training arrays → the first stage's moments (KL) or pre-quantization latents (VQ), float32."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous().float()
    posterior = latent.encode_first_stage(x)
    moments = posterior if isinstance(posterior, torch.Tensor) else posterior.parameters
    return moments.float().cpu().numpy()


def _rows(base, latent, text: bool) -> Iterator[dict[str, Any]]:
    """One record per usable row, encoded ``ENCODE_BATCH`` rows at a time (corrupt images are left out)."""
    from ldm_compat.training.data_images import CorruptImageError

    key, cond_key = base.image_key, latent.options.cond_stage_key
    flips = base.flip_p > 0
    pending: list[tuple[int, np.ndarray, dict]] = []

    def flush():
        rows = [r for r, _, _ in pending]
        arrays = [a for _, a, _ in pending]
        moments = _encode(latent, arrays)
        mirrored = _encode(latent, [np.ascontiguousarray(a[:, ::-1]) for a in arrays]) if flips else None
        cond = None
        if text:
            if cond_key not in pending[0][2]:
                raise ValueError(f"latent cache: cond_stage_key={cond_key!r} is not an entry of the training items")
            texts = [f[cond_key] for _, _, f in pending]
            cond = latent.get_learned_conditioning(texts).float().cpu().numpy()
        for i, row in enumerate(rows):
            record = {"row": row, "moments": moments[i]}
            if flips:
                record["moments_flipped"] = mirrored[i]
            if text:
                record.update(cond=cond[i], cond_text=pending[i][2][cond_key])
            yield record
        pending.clear()

    for row in base.rows:
        row = int(row)
        try:
            item = base.example(row, 0)
        except CorruptImageError as err:
            logger.warning("latent cache: row %d left out (%s)", row, err)
            continue
        array = item[key]
        if base.flip_for(row, 0):  # example() mirrored it for epoch 0: store the unmirrored image's encoding
            array = np.ascontiguousarray(array[:, ::-1])
        pending.append((row, array, item))
        if len(pending) == ENCODE_BATCH:
            yield from flush()
    if pending:
        yield from flush()


def build_cache(base, latent, folder: Path) -> None:
    """Encode ``base`` (an ``ImageDataset``) into ``folder`` (written beside it, then renamed)."""
    text = caches_text(latent)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    records = list(_rows(base, latent, text))
    if not records:
        raise ValueError("latent cache: no usable image in the training set")
    columns = {name: [r[name] for r in records] for name in records[0]}
    arrays = {k: np.stack(v) for k, v in columns.items() if k not in ("row", "cond_text")}
    features = {"row": datasets.Value("int64")}
    for name, array in arrays.items():
        feature = datasets.Array3D if array.ndim == 4 else datasets.Array2D
        features[name] = feature(shape=array.shape[1:], dtype="float32")
    if text:
        features["cond_text"] = datasets.Value("string")
    data = {"row": columns["row"], **{k: list(v) for k, v in arrays.items()}}
    if text:
        data["cond_text"] = columns["cond_text"]
    dataset = datasets.Dataset.from_dict(data, features=datasets.Features(features))
    dataset.save_to_disk(str(tmp / "data"))
    info = {"format": FORMAT, "rows": len(records), "first_stage": "KL moments" if latent.is_kl else "VQ latents",
            "text": text, "flips": base.flip_p > 0}  # fmt: skip
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    try:
        tmp.rename(folder)
    except OSError:  # another process published it first: theirs is the same
        shutil.rmtree(tmp, ignore_errors=True)


class CachedLatentDataset(Dataset):
    """``base``'s items with the cached encodings instead of the image (which is decoded only when the conditioning
    needs it); same keys ``(epoch, index)``, same rows, same seeded flips."""

    def __init__(self, base, cache, latent, *, needs_image: bool):
        self.base, self.needs_image, self.text = base, needs_image, caches_text(latent)
        self.cond_key = latent.options.cond_stage_key
        from ldm_compat.training.data import _in_memory_images

        plain = cache.with_format(None)
        self.position = {int(r): i for i, r in enumerate(plain["row"])}
        self.cache = cache.with_format("numpy")
        # arrays as one in-memory block when they fit (per-row Arrow access costs ~5 ms a row), else read per row
        self.columns = {c: _in_memory_images(cache, c, IN_MEMORY_BYTES) for c in cache.column_names if c != "row"}
        if "cond_text" in cache.column_names:
            self.columns["cond_text"] = list(plain["cond_text"])

    keys_with_epoch = True  # build_dataloader hands (epoch, index) keys, as to an ImageDataset

    @property
    def seed(self):
        return self.base.seed

    @seed.setter
    def seed(self, value) -> None:
        self.base.seed = value  # the flips' seed, set by build_dataloader

    def __len__(self) -> int:
        return len(self.base)

    def _column(self, name: str, position: int):
        column = self.columns.get(name)
        return column[position] if column is not None else self.cache[int(position)][name]

    def __getitem__(self, key) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        rows = self.base.rows
        # a row whose image was found corrupt while caching is not there: the next one, as ImageDataset does
        row = next(int(rows[(index + k) % len(rows)]) for k in range(len(rows))
                   if int(rows[(index + k) % len(rows)]) in self.position)  # fmt: skip
        position = self.position[row]
        item = self.base.example(row, epoch) if self.needs_image else self.base.fields(row)
        flipped = self.base.flip_for(row, epoch)
        item[CACHED_MOMENTS] = np.asarray(self._column("moments_flipped" if flipped else "moments", position))
        if self.text:
            item[CACHED_COND] = np.asarray(self._column("cond", position))
            item[CACHED_COND_TEXT] = str(self._column("cond_text", position))
        return item


def cached_dataset(base, latent, cache_dir, accelerator=None) -> CachedLatentDataset:
    """``base`` served from the cache under ``cache_dir`` (built first if it is not there yet)."""
    from ldm_compat.training.data import ImageDataset

    if not isinstance(base, ImageDataset):
        raise ValueError(
            f"--latent_cache: the training set is a {type(base).__name__}; the cache supports "
            "ldm_compat.training.data.ImageDataset (its rows and flips are known)"
        )
    folder = Path(cache_dir) / fingerprint(base, latent)
    with accelerator.main_process_first() if accelerator is not None else nullcontext():
        if not (folder / INFO_FILE).is_file():
            if accelerator is None or accelerator.is_main_process:
                logger.info("latent cache: encoding %d images into %s", len(base), folder)
                build_cache(base, latent, folder)
        info = json.loads((folder / INFO_FILE).read_text())
        if info.get("format") != FORMAT:
            raise ValueError(f"{folder}: not a latent cache of format {FORMAT} ({info.get('format')!r})")
        cache = datasets.load_from_disk(str(folder / "data"))
    o = latent.options
    needs_image = o.conditioning_key is not None and not caches_text(latent) and o.cond_stage_key == o.first_stage_key
    return CachedLatentDataset(base, cache, latent, needs_image=needs_image)


__all__ = ["CachedLatentDataset", "build_cache", "cached_dataset", "caches_text", "fingerprint"]
