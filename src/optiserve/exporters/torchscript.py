"""TorchScript: a self-contained file that runs in libtorch (C++, mobile) without Python.

From a torch.export program the eager module is traced; from the Python API an nn.Module can be
traced or scripted (scripting keeps data-dependent control flow that tracing would freeze).
The module is always put in eval mode first (BatchNorm and Dropout must export with inference
behaviour) and the caller's module is left as it was given. `freeze` makes the weights
constants and folds Conv+BatchNorm, as libtorch deployments want (torch.jit.optimize_for_inference
goes further, but its MKL-DNN constants cannot be saved to a file).
"""

from __future__ import annotations

import warnings
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from optiserve.convert.torch import load_runnable
from optiserve.core.deps import require
from optiserve.core.errors import first_line
from optiserve.exporters.base import Exported, Exporter, ExportError, Source, Tolerance


class TorchScriptExporter(Exporter):
    format = "torchscript"
    reads = ("torchscript", "pt2")
    framework = "torch"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        mode: Literal["trace", "script"] = Field(
            "trace", description="trace: record the ops run on the check rows; script: compile "
            "the Python code (keeps control flow; needs the nn.Module, i.e. the Python API).")
        freeze: bool = Field(
            True, description="Make weights constants and fold Conv+BatchNorm "
            "(torch.jit.freeze).")

    def export(self, source: Source, config: Config) -> Exported:
        torch = require("torch", extra="torch", feature="TorchScript export")
        module, origin = self._module(source, config, torch)
        args = tuple(torch.from_numpy(np.ascontiguousarray(source.rows[s.name][:2]))
                     for s in source.signature.inputs)
        was_training = getattr(module, "training", False)
        try:
            # a torch.export program fixed its train/eval behaviour when it was exported (and
            # refuses .eval()); anything else is switched to inference behaviour here
            if not (source.format == "pt2" and source.obj is None):
                module.eval()
            scripted = self._compile(module, args, config, torch)
            eager_error = _max_error(module, scripted, args, torch)
        finally:
            if source.obj is not None:
                source.obj.train(was_training)
        notes = [f"TorchScript by torch.jit.{config.mode} from {origin}, eval mode"
                 + (", frozen (Conv+BatchNorm folded)" if config.freeze else "")
                 + f"; max abs difference to the eager module {eager_error:.2g} on 2 rows"]
        out = source.workdir / "model.pt"
        torch.jit.save(scripted, str(out))
        return Exported(path=out, signature=source.signature, notes=notes,
                        tolerance=Tolerance(atol=1e-4, rtol=1e-3))

    @staticmethod
    def _module(source: Source, config: Config, torch) -> tuple[Any, str]:
        if source.obj is not None and isinstance(source.obj, torch.nn.Module):
            return source.obj, f"the {type(source.obj).__name__} module"
        if config.mode == "script" and source.format != "torchscript":
            raise ExportError("Scripting needs the Python nn.Module; a stored "
                              f"{source.format} file has lost its Python code.",
                              hint="Pass the module to optiserve.export(module, 'torchscript', "
                              "name=..., options={'mode': 'script'}), or use mode 'trace'.")
        what = ("the torch.export program's eager module" if source.format == "pt2"
                else "the stored TorchScript")
        return load_runnable(source.path, source.format), what

    @staticmethod
    def _compile(module: Any, args: tuple, config: Config, torch) -> Any:
        try:
            with torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if isinstance(module, torch.jit.ScriptModule):
                    scripted = module
                elif config.mode == "script":
                    scripted = torch.jit.script(module)
                else:
                    scripted = torch.jit.trace(module, args, strict=False, check_trace=False)
                if config.freeze:
                    scripted = torch.jit.freeze(scripted.eval())
        except Exception as exc:  # torch raises many types for code it cannot compile
            alternative = "mode 'trace'" if config.mode == "script" else "the onnx/ort export"
            raise ExportError(f"torch.jit.{config.mode} failed: {first_line(exc)}",
                              hint=f"Try {alternative}, or the ort/openvino export.") from None
        return scripted


def _max_error(module: Any, scripted: Any, args: tuple, torch) -> float:
    """Largest difference between the eager module and its TorchScript on the same rows."""
    with torch.inference_mode():
        want, got = module(*args), scripted(*args)
    pairs = zip(_tensors(want, torch), _tensors(got, torch))
    return max((float((w.float() - g.float()).abs().max()) for w, g in pairs), default=0.0)


def _tensors(result: Any, torch) -> list:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, dict):
        return list(result.values())
    return list(result)
