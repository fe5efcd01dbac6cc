"""The offline demo behind ``ldm-compat demo`` (README's first command)."""

from __future__ import annotations

import os


def run(args) -> int:
    from ldm_compat.training.data import load_digits_dataset

    os.makedirs(args.output, exist_ok=True)
    dataset = load_digits_dataset()
    print(f"[demo] embedded data: scikit-learn load_digits as a datasets.Dataset, {len(dataset)} images "
          f"of {tuple(dataset[0]['image'].shape)}, columns {dataset.column_names}")
    print(f"[demo] output folder: {os.path.abspath(args.output)}")
    return 0
