"""server/multimodal/image_processor.py against transformers' own (PIL-backend) image processors of
the three tower families, on random images of several shapes, from the folders they save."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from server.multimodal.image_processor import ImageProcessor, ImageProcessorError, expand_to_square

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

REFERENCES = {
    # CLIP ViT-L/14-336 as Parrot and LLaVA-1.5 use it
    "clip-336": lambda: CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
    # SigLIP: a fixed square, mean/std 0.5, bilinear in some releases
    "siglip-384": lambda: SiglipImageProcessorPil(size={"height": 384, "width": 384}, resample=2),
    # DINOv2: shortest edge 256, centre crop 224, ImageNet mean/std
    "dinov2": lambda: BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                           image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]),
}
SHAPES = [(300, 200), (199, 517), (224, 224), (64, 97), (1000, 333)]  # (width, height)


def random_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module", params=list(REFERENCES))
def family(request, tmp_path_factory):
    reference = REFERENCES[request.param]()
    folder = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(folder)
    return reference, folder


def _reference(reference, image: Image.Image) -> torch.Tensor:
    return torch.as_tensor(np.asarray(reference(images=image, return_tensors="np")["pixel_values"][0]))


@pytest.mark.parametrize("width,height", SHAPES)
def test_square_mode_equals_transformers(family, width, height):
    reference, folder = family
    ours = ImageProcessor.from_folder(folder, aspect="square")
    image = random_image(width, height, width * 7 + height)
    got, want = ours(image), _reference(reference, image)
    assert got.dtype == torch.float32 and got.shape == want.shape
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=0)
    if ours.output_size is not None:
        assert tuple(got.shape[1:]) == ours.output_size


@pytest.mark.parametrize("width,height", SHAPES[:3])
def test_pad_mode_is_expand2square_then_transformers(family, width, height):
    reference, folder = family
    ours = ImageProcessor.from_folder(folder, aspect="pad")
    image = random_image(width, height, width + height)
    background = tuple(int(x * 255) for x in reference.image_mean)
    torch.testing.assert_close(ours(image), _reference(reference, expand_to_square(image, background)).float(),
                               atol=1e-5, rtol=0)


def test_expand_to_square_centres_on_the_mean_colour():
    ours = ImageProcessor()  # CLIP's defaults: the released Parrot's background
    assert ours.background == (122, 116, 104)
    square = expand_to_square(Image.new("RGB", (10, 4), (255, 255, 255)), ours.background)
    assert square.size == (10, 10)
    assert square.getpixel((0, 0)) == (122, 116, 104) and square.getpixel((0, 2)) == (122, 116, 104)
    assert square.getpixel((0, 3)) == (255, 255, 255) and square.getpixel((9, 6)) == (255, 255, 255)
    assert square.getpixel((0, 7)) == (122, 116, 104)


def test_legacy_int_sizes_and_disabled_steps():
    clip = ImageProcessor.from_dict({"size": 224, "crop_size": 224}, aspect="square")
    assert clip.shortest_edge == 224 and clip.crop == (224, 224)
    siglip = ImageProcessor.from_dict({"image_processor_type": "SiglipImageProcessor", "size": 256})
    assert siglip.size == (256, 256) and siglip.crop is None and siglip.mean == (0.5, 0.5, 0.5)
    raw = ImageProcessor.from_dict({"do_resize": False, "do_center_crop": False, "do_rescale": False,
                                    "do_normalize": False}, aspect="square")
    image = random_image(5, 3, 0)
    assert torch.equal(raw(image), torch.from_numpy(np.asarray(image).transpose(2, 0, 1).astype(np.float32)))


@pytest.mark.parametrize("raw,key", [
    ({"size": {"longest_edge": 10}}, "size"),
    ({"crop_size": "big"}, "crop_size"),
    ({"image_mean": [0.5, 0.5]}, "image_mean"),
    ({"image_std": [0.5, 0.0, 0.5]}, "image_std"),
    ({"resample": 9}, "resample"),
    ({"rescale_factor": 3}, "rescale_factor"),
])
def test_bad_settings_name_the_key(raw, key):
    with pytest.raises(ImageProcessorError, match=key):
        ImageProcessor.from_dict(raw)


def test_missing_folder_file_and_bad_aspect(tmp_path):
    with pytest.raises(ImageProcessorError, match="preprocessor_config.json: missing"):
        ImageProcessor.from_folder(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps([1]))
    with pytest.raises(ImageProcessorError, match="JSON object"):
        ImageProcessor.from_folder(tmp_path)
    with pytest.raises(ImageProcessorError, match="aspect"):
        ImageProcessor.from_dict({}, aspect="stretch")
