"""Export a trained student as timm loads it: ``model.safetensors`` + ``config.json``.

The pair loads with ``timm.create_model("local-dir:RUN_DIR", pretrained=True)``,
with ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...,
num_classes=N))``, and as a teacher spec ``NAME@RUN_DIR/model.safetensors``.
Distillation heads (projectors) are training-only and are not exported.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from timm.models._hub import save_config_for_hf


def export_student(model: torch.nn.Module, out_dir: str | Path, img_size: tuple[int, int],
                   label_names: list[str] | None = None) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    weights = out_dir / "model.safetensors"
    save_file(state, str(weights))
    model_config = {"label_names": list(label_names)} if label_names else {}
    save_config_for_hf(model, str(out_dir / "config.json"), model_config=model_config,
                       data_config={"input_size": (3, *img_size)})
    return weights
