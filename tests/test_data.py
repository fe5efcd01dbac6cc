"""Training data: sources, the original item/batch conventions, determinism, corrupt and empty data."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_compat.training.data import (
    ImageDataset,
    build_dataloader,
    build_dataset,
    collate,
    get_conditioning,
    get_input,
    load_digits_dataset,
)
from ldm_compat.training.data_images import CorruptImageError

DATA_MODULE = {"target": "main.DataModuleFromConfig", "params": {"batch_size": 4}}


def lsun_reference(path, size):
    """latent-diffusion ldm/data/lsun.py LSUNBase.__getitem__ (no flip): RGB, center crop, bicubic resize, /127.5-1."""
    image = Image.open(path)
    if not image.mode == "RGB":
        image = image.convert("RGB")
    img = np.array(image).astype(np.uint8)
    crop = min(img.shape[0], img.shape[1])
    h, w = img.shape[0], img.shape[1]
    img = img[(h - crop) // 2 : (h + crop) // 2, (w - crop) // 2 : (w + crop) // 2]
    image = Image.fromarray(img).resize((size, size), resample=Image.BICUBIC)
    return (np.array(image).astype(np.uint8) / 127.5 - 1.0).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An imagefolder: two classes of RGB / grey PNGs of different aspect ratios, and one corrupt file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, shape in (("cat", (10, 14, 3)), ("dog", (12, 9))):
        (root / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / "train" / label / f"{i}.png")
    (root / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def _imagefolder(folder, tmp_path, **params):
    params = {"source": "imagefolder", "data_dir": str(folder), "cache_dir": str(tmp_path / "cache"), **params}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset({"target": "ldm_compat.training.data.ImageDataset", "params": params})
    return dataset, [str(w.message) for w in caught]


# ---------------------------------------------------------------------------------------------------------- digits


def test_digits_are_the_default_in_the_original_convention():
    from sklearn.datasets import load_digits

    digits = load_digits()
    dataset = build_dataset(DATA_MODULE, "train")
    assert len(dataset) == 1797
    item = dataset[5]
    assert item["image"].shape == (8, 8, 1) and item["image"].dtype == np.float32
    np.testing.assert_array_equal(item["image"][..., 0], (digits.images[5] / 16.0 * 2 - 1).astype(np.float32))
    assert item["class_label"] == digits.target[5]
    assert "caption" not in item


def test_digits_split_slices_and_nearest_upsampling():
    train = build_dataset({"params": {"split": "train[:90%]"}})
    val = build_dataset({"params": {"split": "train[90%:]"}})
    assert len(train) + len(val) == 1797 and len(val) == round(1797 * 0.1)
    big = build_dataset({"source": "digits", "image_size": 16, "interpolation": "nearest"})
    repeated = load_digits_dataset(16)[3]["image"] * 2 - 1  # pixel repetition
    np.testing.assert_array_equal(big[3]["image"], repeated)
    smooth = build_dataset({"source": "digits", "image_size": 16, "interpolation": "bilinear"})[3]["image"]
    assert smooth.min() >= -1 and smooth.max() <= 1 and not np.array_equal(smooth, repeated)
    with pytest.raises(ValueError, match="the digits have one split"):
        build_dataset({"source": "digits", "split": "test"})


# ---------------------------------------------------------------------------------------------------------- get_input


def test_get_input_is_the_original_rearrange():
    x = torch.randn(2, 5, 6, 3)
    out = get_input({"image": x}, "image")
    assert torch.equal(out, x.permute(0, 3, 1, 2)) and out.is_contiguous()
    grey = torch.randn(2, 5, 6)  # 3-D: the original adds a channel last
    assert torch.equal(get_input({"image": grey}, "image"), grey[:, None])
    uint8 = torch.randint(0, 255, (1, 4, 4, 1), dtype=torch.uint8)
    assert torch.equal(get_input({"image": uint8}, "image"), uint8.permute(0, 3, 1, 2).float())  # .float() only
    chw = torch.randn(2, 3, 8, 8)  # b c h w is accepted when it is unambiguous
    assert torch.equal(get_input({"image": chw}, "image"), chw)
    square = torch.randn(2, 3, 4, 3)  # ambiguous: read channels-last like the original, unless channels says
    assert torch.equal(get_input({"image": square}, "image"), square.permute(0, 3, 1, 2))
    odd = torch.randn(2, 3, 4, 5)
    assert torch.equal(get_input({"image": odd}, "image", channels=3), odd)
    assert torch.equal(get_input({"image": np.zeros((1, 2, 2, 1))}, "image"), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match="batch has no key 'jpg'"):
        get_input({"image": x}, "jpg")
    with pytest.raises(ValueError, match="expected b h w c"):
        get_input({"image": torch.zeros(3, 3)}, "image")


def test_conditioning_from_the_batch():
    batch = {"image": torch.zeros(2, 4, 4, 3), "class_label": torch.tensor([1, 2]), "context": torch.ones(2, 7, 16)}
    batch["concat"] = torch.zeros(2, 4, 4, 2)
    assert get_conditioning(batch, None) is None
    assert torch.equal(get_conditioning(batch, "adm")["class_labels"], torch.tensor([1, 2]))
    assert get_conditioning(batch, "crossattn")["encoder_hidden_states"].shape == (2, 7, 16)
    hybrid = get_conditioning(batch, "hybrid")
    assert hybrid["concat"].shape == (2, 2, 4, 4) and set(hybrid) == {"encoder_hidden_states", "concat"}
    # with original_cond they become the original DiffusionWrapper dict (adm labels travel in c_crossattn)
    from ldm_compat.models.conditioning import original_cond

    assert torch.equal(original_cond("adm", **get_conditioning(batch, "adm"))["c_crossattn"][0], torch.tensor([1, 2]))
    assert set(original_cond("hybrid", **hybrid)) == {"c_concat", "c_crossattn"}
    with pytest.raises(ValueError, match="no text encoder"):
        get_conditioning({"txt": ["a", "b"]}, "crossattn", {"cond_stage_key": "txt"})
    with pytest.raises(ValueError, match="needs batch key 'class_label'"):
        get_conditioning({"image": batch["image"]}, "adm")


# ---------------------------------------------------------------------------------------------------------- files


def test_imagefolder_matches_lsun_preprocessing_and_skips_corrupt(folder, tmp_path):
    dataset, messages = _imagefolder(folder, tmp_path, image_size=8)
    assert len(dataset) == 6 and len(dataset.skipped) == 1
    assert any("skipped 1 corrupt image(s) of 7" in m and "broken.png" in m for m in messages)
    paths = sorted((folder / "train").glob("*/[0-9].png"))
    seen = {dataset[i]["image"].tobytes(): dataset[i]["class_label"] for i in range(len(dataset))}
    for path in paths:
        ref = lsun_reference(path, 8)
        assert ref.tobytes() in seen, path
        assert seen[ref.tobytes()] == (0 if path.parent.name == "cat" else 1)


def test_corrupt_images_can_fail_and_empty_data_is_an_error(folder, tmp_path):
    with pytest.raises(ValueError, match="broken.png: cannot be decoded"):
        _imagefolder(folder, tmp_path, image_size=8, on_corrupt="raise")
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match="the dataset is empty"):
        _imagefolder(only_broken, tmp_path, image_size=8)
    no_files = tmp_path / "no_files"
    no_files.mkdir()
    with pytest.raises(ValueError, match=r"data_dir=.*no_files: the dataset is empty \(no image files\)"):
        _imagefolder(no_files, tmp_path, image_size=8)
    with pytest.raises(ValueError, match="different sizes"):
        _imagefolder(folder, tmp_path)  # no image_size and mixed sizes: a clear error, not a collate crash


def test_unchecked_corrupt_image_is_replaced_when_read(folder, tmp_path):
    dataset, _ = _imagefolder(folder, tmp_path, image_size=4, check_images=False)
    assert len(dataset) == 7
    broken = next(i for i in range(7) if "broken" in str(dataset.hf[i]["image"]["path"]))
    with pytest.warns(UserWarning, match="skipped corrupt image"):
        item = dataset[broken]
    np.testing.assert_array_equal(item["image"], dataset[(broken + 1) % 7]["image"])
    strict, _ = _imagefolder(folder, tmp_path, image_size=4, check_images=False, on_corrupt="raise")
    with pytest.raises(CorruptImageError):
        strict[broken]


def test_disk_and_hub_sources_pass_captions(folder, tmp_path):
    import datasets

    paths = sorted(str(p) for p in (folder / "train").glob("*/[0-9].png"))
    table = datasets.Dataset.from_dict({"image": paths, "caption": [f"picture {i}" for i in range(6)]})
    table = table.cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(tmp_path / "saved"))
    dataset = build_dataset({"path": str(tmp_path / "saved"), "split": "train[2:]", "image_size": 6, "mode": "L"})
    assert len(dataset) == 4 and dataset.source == "disk"
    item = dataset[0]
    assert item["caption"] == item["txt"] == "picture 2" and item["image"].shape == (6, 6, 1)
    batch = collate([dataset[0], dataset[1]])
    assert batch["txt"] == ["picture 2", "picture 3"] and batch["image"].shape == (2, 6, 6, 1)
    with pytest.raises(ValueError, match="has splits"):
        build_dataset({"path": str(tmp_path / "saved"), "split": "validation"})
    # the Hub code path (datasets.load_dataset(name, ...)) with a local folder as the name
    hub = build_dataset(
        {
            "name": str(folder),
            "image_size": 8,
            "cache_dir": str(tmp_path / "c2"),
            "check_images": True,
            "max_samples": 3,
        }
    )
    assert hub.source == "hub" and len(hub) == 3 and hub[0]["image"].shape == (8, 8, 3)


# ---------------------------------------------------------------------------------------------------------- loader


def _batches(loader, epochs=2):
    out = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        out += [(b["image"].clone(), b["class_label"].clone()) for b in loader]
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) and torch.equal(u, v) for (x, u), (y, v) in zip(a, b))


def test_loader_is_deterministic_given_the_seed_whatever_the_workers():
    dataset = build_dataset({"params": {"split": "train[:64]", "flip_p": 0.5}})
    a = _batches(build_dataloader(dataset, 16, seed=5))
    b = _batches(build_dataloader(dataset, 16, seed=5, num_workers=2))
    c = _batches(build_dataloader(dataset, 16, seed=6))
    assert _same(a, b) and not _same(a, c)
    first, second = a[:4], a[4:]
    assert not all(torch.equal(x, y) for (x, _), (y, _) in zip(first, second))  # reshuffled and reflipped per epoch


def test_flips_are_seeded_and_mirror_the_image():
    dataset = build_dataset({"params": {"split": "train[:200]", "flip_p": 1.0}})
    plain = build_dataset({"params": {"split": "train[:200]"}})
    np.testing.assert_array_equal(dataset[(3, 7)]["image"], plain[7]["image"][:, ::-1])
    half = ImageDataset(split="train[:400]", flip_p=0.5, seed=1)
    flips = np.array([half.flip_for(r, 0) for r in range(400)])
    assert 120 < flips.sum() < 280  # about half (binomial, > 8 standard deviations of margin)
    assert (flips != np.array([half.flip_for(r, 1) for r in range(400)])).any()


def test_resume_with_accelerate_skip_first_batches_sees_the_same_batches():
    from accelerate.data_loader import prepare_data_loader, skip_first_batches

    dataset = build_dataset({"params": {"split": "train[:80]", "flip_p": 0.5}})

    def prepared():
        loader = build_dataloader(dataset, 8, seed=9)
        return prepare_data_loader(loader, torch.device("cpu"), use_seedable_sampler=True, data_seed=9)

    full = prepared()
    full.set_epoch(1)
    reference = [b["image"] for b in full]
    resumed = prepared()
    resumed.set_epoch(1)
    rest = [b["image"] for b in skip_first_batches(resumed, 4)]
    assert len(rest) == len(reference) - 4 and all(torch.equal(x, y) for x, y in zip(rest, reference[4:]))


def test_collate_and_loader_errors():
    batch = collate([{"image": np.zeros((2, 2, 1), np.float32), "class_label": np.int64(3), "txt": "a"}] * 2)
    assert batch["class_label"].dtype == torch.long and batch["txt"] == ["a", "a"]
    with pytest.raises(ValueError, match="different shapes"):
        collate([{"image": np.zeros((2, 2, 1))}, {"image": np.zeros((3, 3, 1))}])
    dataset = build_dataset({"params": {"split": "train[:4]"}})
    with pytest.raises(ValueError, match="batch_size=0"):
        build_dataloader(dataset, 0)


def test_build_dataset_errors_name_the_key():
    with pytest.raises(ValueError, match=r"data.params.validation: not configured"):
        build_dataset(DATA_MODULE, "validation")
    with pytest.raises(ValueError, match=r"data.params.train.params: unknown key\(s\) sise"):
        build_dataset({"target": "x", "params": {"batch_size": 2, "train": {"params": {"sise": 8}}}})
    with pytest.raises(ValueError, match=r"target=ldm.data.lsun.LSUNChurchesTrain: cannot import"):
        build_dataset({"target": "ldm.data.lsun.LSUNChurchesTrain", "params": {}})
    with pytest.raises(ValueError, match=r"source='web'"):
        build_dataset({"source": "web"})
    with pytest.raises(ValueError, match=r"flip_p=2"):
        build_dataset({"flip_p": 2})
    with pytest.raises(ValueError, match=r"give one of name"):
        build_dataset({"name": "a", "path": "b"})
    with pytest.raises(FileNotFoundError, match="no such folder"):
        build_dataset({"data_dir": "/nonexistent/images"})


def test_other_importable_targets_are_instantiated_like_the_original():
    dataset = build_dataset({"target": "torch.utils.data.TensorDataset", "params": {}})
    assert isinstance(dataset, torch.utils.data.TensorDataset)


# ---------------------------------------------------------------------------------------------------------- configs

CONFIGS = ["digits_ddpm.yaml", "digits_v_prediction.yaml", "cifar10_ddpm.yaml"]


@pytest.mark.parametrize("name", CONFIGS)
def test_example_configs_load_and_have_what_the_trainer_needs(name):
    import inspect
    from pathlib import Path

    from ldm_compat.config import load_ldm_config, to_plain
    from ldm_compat.models.unet_ldm import LDMUNetModel
    from ldm_compat.training.lr_schedulers import build_lr_scheduler
    from ldm_compat.training.settings import TrainSettings

    path = Path(__file__).resolve().parents[1] / "configs" / name
    config = load_ldm_config(path)
    assert config.model.target == "ldm.models.diffusion.ddpm.DDPM"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown model.params key would warn
        settings = TrainSettings.from_config(config, str(path))
    params = settings.params
    assert settings.base_learning_rate > 0 and settings.batch_size > 0 and settings.max_steps > 0
    assert settings.accumulate_grad_batches >= 1 and settings.image_log_frequency > 0
    unet_params = params["unet_config"]["params"]
    assert unet_params["image_size"] == params["image_size"]
    assert unet_params["in_channels"] == unet_params["out_channels"] == params["channels"]
    with torch.device("meta"):
        unet = LDMUNetModel.from_ldm_config(params["unet_config"])
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    build_lr_scheduler(optimizer, params.get("scheduler_config"), num_training_steps=settings.max_steps)
    allowed = set(inspect.signature(ImageDataset.__init__).parameters)
    for split in ("train", "validation"):
        entry = to_plain(config.data.params[split])
        assert entry["target"] == "ldm_compat.training.data.ImageDataset" and set(entry["params"]) <= allowed
    if name.startswith("cifar10"):
        # Ho et al. 2020: 35.7M parameters, linear betas 1e-4…0.02 (latent-diffusion's "sqrt_linear"), T = 1000
        assert sum(p.numel() for p in unet.parameters()) == pytest.approx(35.7e6, rel=2e-3)
        assert (params["beta_schedule"], params["linear_start"], params["linear_end"]) == ("sqrt_linear", 1e-4, 0.02)
        assert params["timesteps"] == 1000 and unet_params["dropout"] == 0.1
        return
    train = build_dataset(config.data, "train", image_size=params["image_size"])
    item = train[0]
    assert item[params["first_stage_key"]].shape == (params["image_size"], params["image_size"], params["channels"])
    assert len(build_dataset(config.data, "validation", image_size=params["image_size"])) > 0
    if name == "digits_v_prediction.yaml":
        assert params["parameterization"] == "v"
