"""What an image costs the API layer before the engine sees it: decoding a ``data:`` URL (base64,
JPEG, RGB, content hash) and pre-processing it for the tower, ours against transformers' PIL image
processor with LLaVA's pad-to-square done first; prints the BENCHMARKS.md table.

    python benchmarks/images.py [--repeats 15]

Images: matplotlib's sample photograph (Grace Hopper) resized to common photo sizes and saved as
JPEG (quality 90). Processors: CLIP ViT-L/14-336 as Parrot-7B uses it (shortest edge 336, centre
crop 336) and the demo's DINOv2-small (224 x 224). Ours and transformers' alternate call by call,
so both see the same machine load; the table gives medians in ms per image (one thread).
"""

from __future__ import annotations

import argparse
import base64
import io
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from server.model.tower_from_onnx import sample_photo  # noqa: E402
from server.multimodal.image_processor import ImageProcessor, expand_to_square  # noqa: E402
from server.multimodal.media import MediaPolicy, load_image  # noqa: E402

SIZES = [(640, 480), (1280, 960), (1920, 1080), (4032, 3024)]
CONFIGS = {
    "CLIP-336 (Parrot-7B)": dict(image_processor_type="CLIPImageProcessor", size={"shortest_edge": 336},
                                 crop_size={"height": 336, "width": 336}),
    "DINOv2-S 224 (demo)": dict(image_processor_type="BitImageProcessor", size={"height": 224, "width": 224},
                                do_center_crop=False, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
}


def reference_processor(raw: dict):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    kw = {k: v for k, v in raw.items() if k != "image_processor_type"}
    return (CLIPImageProcessorPil if raw["image_processor_type"].startswith("CLIP") else BitImageProcessorPil)(**kw)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import torch
    torch.set_num_threads(1)
    photo = Image.open(sample_photo()).convert("RGB")
    policy = MediaPolicy()
    print("| image | JPEG bytes | decode + hash | processor | ours | transformers (PIL) | ours / transformers | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for w, h in SIZES:
        buf = io.BytesIO()
        photo.resize((w, h), Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=90)
        url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
        decode_ms = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            loaded = load_image(url, policy)
            decode_ms.append((time.perf_counter() - t0) * 1e3)
        for name, raw in CONFIGS.items():
            ours_proc = ImageProcessor.from_dict(raw, aspect="pad")
            ref_proc = reference_processor(raw)
            ours_ms, ref_ms = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ours = ours_proc(loaded.image)
                t1 = time.perf_counter()
                ref = ref_proc(images=expand_to_square(loaded.image, ours_proc.background),
                               return_tensors="np")["pixel_values"][0]
                t2 = time.perf_counter()
                ours_ms.append((t1 - t0) * 1e3)
                ref_ms.append((t2 - t1) * 1e3)
            diff = float(np.abs(ours.numpy() - ref).max())
            mo, mr = statistics.median(ours_ms), statistics.median(ref_ms)
            print(f"| {w}x{h} | {len(buf.getvalue()):,} | {statistics.median(decode_ms):.1f} ms | {name} | {mo:.1f} ms | "
                  f"{mr:.1f} ms | {mo / mr:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
