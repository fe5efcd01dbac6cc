"""``ldm-compat convert`` and ``ldm-compat export``."""

from __future__ import annotations

import json
from pathlib import Path


def convert(args) -> int:
    from ldm_compat.convert.to_diffusers import original_to_diffusers

    if args.native and args.config:
        # refuse an inexpressible config before writing anything
        from ldm_compat.config import load_ldm_config, to_plain
        from ldm_compat.convert.native import native_unet_config

        native_unet_config(to_plain(load_ldm_config(args.config)).get("model", {})["params"]["unet_config"])
    unet_options = {
        "num_heads": args.num_heads,
        "num_head_channels": args.num_head_channels,
        "use_new_attention_order": args.use_new_attention_order or None,
        "image_size": args.image_size,
    }
    folder = original_to_diffusers(
        args.checkpoint, args.config, args.output, use_ema=not args.no_ema, overwrite=args.overwrite,
        schedule_mismatch=args.schedule_mismatch, unet_options={k: v for k, v in unet_options.items() if v is not None},
        tokenizer_path=args.tokenizer, open_clip_config=args.open_clip_config, scale_factor=args.scale_factor,
    )  # fmt: skip
    class_name = json.loads((Path(folder) / "model_index.json").read_text()).get("_class_name", "LDMCompatPipeline")
    stock = "" if class_name == "LDMCompatPipeline" else f", or as {class_name} by DiffusionPipeline.from_pretrained"
    print(f"wrote {folder} (load it with LDMCompatPipeline.from_pretrained({str(folder)!r}){stock})")
    if args.native:
        from ldm_compat.convert.native import write_native_unet

        path = write_native_unet(folder, folder / "native_unet")
        print(f"wrote {path} (a stock diffusers UNet)")
    return 0


def export(args) -> int:
    from ldm_compat.convert.export import diffusers_to_original

    path = diffusers_to_original(args.folder, args.output, config_output=args.config_output, overwrite=args.overwrite)
    print(f"wrote {path}" + (f" and {args.config_output}" if args.config_output else ""))
    return 0
