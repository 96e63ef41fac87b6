"""Weights in from the field's tools: arcface_torch `.pth` state dicts and ONNX face models,
written as jfacerec workdirs (`python -m jfacerec.convert`).

    from jfacerec import interop
    interop.convert_torch("backbone.pth", "iresnet50", "workdirs/r50")
    interop.convert_onnx("model.onnx", "iresnet50", "workdirs/r50_onnx")
"""

from __future__ import annotations

from jfacerec.interop import arcface_torch
from jfacerec.interop.converted import complete_variables, write_workdir
from jfacerec.interop.torch_pth import read_state_dict

SUPPORTED = arcface_torch.SUPPORTED


def convert_torch(path: str, model: str, workdir: str, *, num_classes: int = 1,
                  seed: int = 0) -> None:
    """Writes `workdir` from arcface_torch's state dict `path` of backbone `model` (one of
    SUPPORTED). ValueError, naming the file, for a file that is unsafe, damaged, or of another
    model; nothing is written then."""
    spec = arcface_torch.layers(model)
    weights = arcface_torch.split_state_dict(read_state_dict(path), model, path)
    backbone = arcface_torch.to_variables(spec, weights)
    config, variables = complete_variables(backbone, model, num_classes, seed, path)
    write_workdir(workdir, config, variables, num_classes)


def convert_onnx(path: str, model: str, workdir: str, *, num_classes: int = 1,
                 seed: int = 0) -> None:
    """Writes `workdir` from the ONNX graph `path` of backbone `model` (see onnx_import.py)."""
    from jfacerec.interop.onnx_import import read_layers  # onnx is an optional dependency

    spec = arcface_torch.layers(model)
    backbone = arcface_torch.to_variables(spec, read_layers(path, spec))
    config, variables = complete_variables(backbone, model, num_classes, seed, path)
    write_workdir(workdir, config, variables, num_classes)


__all__ = ["SUPPORTED", "convert_onnx", "convert_torch"]
