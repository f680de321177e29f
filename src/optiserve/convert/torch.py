"""PyTorch: nn.Module (Python API), TorchScript files and torch.export programs; ONNX export.

An nn.Module is stored as TorchScript (traced in eval mode), a self-contained file that needs no
Python class to load. Hugging Face modules are switched from SDPA to eager attention first:
that graph is the one ONNX Runtime's transformer optimizer can fuse into Attention kernels.
"""

from __future__ import annotations

import inspect
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from optiserve.convert.formats import Imported
from optiserve.core.deps import require
from optiserve.core.errors import ConfigError, ConversionError, ModelLoadError, first_line
from optiserve.core.types import Signature, TensorSpec, example_inputs

_SPEC = re.compile(r"^\s*(\w+)\s*:\s*(\w+)\s*\[([-\d,\s]*)\]\s*$")


def _torch(feature: str):
    return require("torch", extra="torch", feature=feature)


def parse_input_spec(text: str) -> TensorSpec:
    """'input_ids:int64[-1,128]' -> TensorSpec."""
    m = _SPEC.match(text)
    if not m:
        raise ConfigError(f"Input spec {text!r} is not NAME:DTYPE[DIMS].",
                          hint="Example: --input 'pixels:float32[-1,1,32,32]' (-1 = dynamic).")
    name, dtype, dims = m.groups()
    try:
        np.dtype(dtype)
    except TypeError:
        raise ConfigError(f"Unknown dtype {dtype!r} in input spec {text!r}.",
                          hint="Use a numpy dtype name: float32, int64, ...") from None
    shape = tuple(int(d) for d in dims.split(",") if d.strip())
    if any(d < -1 or d == 0 for d in shape) or np.prod([max(d, 8) for d in shape]) > 1e8:
        raise ConfigError(f"Input spec {text!r} has a dimension that is not usable.",
                          hint="Dimensions are positive sizes, or -1 for a dynamic one, and the "
                          "tensor must stay under 10^8 elements.")
    return TensorSpec(name=name, dtype=dtype, shape=shape)


def _as_tuple(example_inputs: Any, names: list[str]) -> tuple:
    torch = _torch("PyTorch models")
    if isinstance(example_inputs, dict):
        return tuple(torch.as_tensor(example_inputs[n]) for n in names if n in example_inputs)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    return tuple(torch.as_tensor(x) for x in example_inputs)


def _forward_names(module: Any, n: int) -> list[str]:
    try:
        params = [p for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        names = [p.name for p in params][:n]
    except (TypeError, ValueError):
        names = []
    return names if len(names) == n else [f"input_{i}" for i in range(n)]


def _specs(names: list[str], tensors: tuple) -> tuple[TensorSpec, ...]:
    specs = []
    for name, t in zip(names, tensors):
        integer = not t.dtype.is_floating_point
        shape = tuple(-1 if i == 0 or (integer and t.dim() == 2) else int(d)
                      for i, d in enumerate(t.shape))
        specs.append(TensorSpec(name=name, dtype=str(t.dtype).removeprefix("torch."),
                                shape=shape))
    return tuple(specs)


def _output_specs(outputs: Any) -> tuple[TensorSpec, ...]:
    torch = _torch("PyTorch models")
    if isinstance(outputs, torch.Tensor):
        outputs = (outputs,)
    elif isinstance(outputs, dict):
        outputs = tuple(outputs.values())
    names = ["output"] if len(outputs) == 1 else [f"output_{i}" for i in range(len(outputs))]
    return tuple(TensorSpec(name=n, dtype=str(o.dtype).removeprefix("torch."),
                            shape=(-1, *o.shape[1:])) for n, o in zip(names, outputs))


def _hf_facts(module: Any) -> tuple[dict[str, Any], Any]:
    """Switch a Hugging Face submodule to eager attention; return heads/hidden for fusion and
    a function that restores the caller's setting."""
    for sub in module.modules():
        cfg = getattr(sub, "config", None)
        if cfg is None or not hasattr(cfg, "num_attention_heads"):
            continue
        facts = {"num_heads": int(cfg.num_attention_heads), "hidden_size": int(cfg.hidden_size),
                 "model_type": str(getattr(cfg, "model_type", "bert"))}
        before = getattr(cfg, "_attn_implementation", None)
        if hasattr(sub, "set_attn_implementation") and before not in (None, "eager"):
            sub.set_attn_implementation("eager")
            return facts, lambda: sub.set_attn_implementation(before)
        return facts, lambda: None
    return {}, lambda: None


def import_torch_object(obj: Any, workdir: Path, *, example_inputs: Any = None) -> Imported:
    torch = _torch("Registering a PyTorch model")
    if isinstance(obj, torch.export.ExportedProgram):
        path = workdir / "model.pt2"
        torch.export.save(obj, str(path))
        return import_torch_file(path, "pt2")
    if example_inputs is None:
        raise ConfigError("Registering a PyTorch module needs example_inputs.",
                          hint="Pass example_inputs=(tensor, ...) with a batch of real inputs.")
    meta: dict[str, Any] = {}
    restore = lambda: None  # noqa: E731
    was_training = getattr(obj, "training", False)
    names = _forward_names(obj, len(example_inputs) if isinstance(example_inputs, (tuple, list))
                           else 1) if not isinstance(example_inputs, dict) else list(example_inputs)
    args = _as_tuple(example_inputs, names)
    try:
        if not isinstance(obj, torch.jit.ScriptModule):
            meta, restore = _hf_facts(obj)
            obj.eval()  # BatchNorm/Dropout must be traced with inference behaviour
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            scripted = obj if isinstance(obj, torch.jit.ScriptModule) else torch.jit.trace(
                obj, args, strict=False, check_trace=False)
            outputs = scripted(*args)
        path = workdir / "model.pt"
        torch.jit.save(scripted, str(path))
    finally:  # the caller's module is left as it was given
        restore()
        obj.train(was_training)
    sig = Signature(inputs=_specs(names, args), outputs=_output_specs(outputs))
    return Imported(path=path, format="torchscript", signature=sig, meta=meta)


def import_torch_file(path: Path, fmt: str, *, input_specs: list | None = None) -> Imported:
    torch = _torch("Loading a PyTorch model")
    try:
        if fmt == "pt2":
            program = torch.export.load(str(path))
        else:
            module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ModelLoadError(str(path), f"torch cannot load it ({first_line(exc)})",
                             hint="Re-save it with torch.jit.save or torch.export.save.") from None
    if fmt == "pt2":
        return Imported(path=path, format="pt2", signature=_program_signature(program))
    if not input_specs:
        raise ConfigError(
            f"TorchScript file {path} does not record its input shapes.",
            hint="Name them: --input 'NAME:DTYPE[DIMS]' per input, e.g. "
            "--input 'pixels:float32[-1,1,32,32]'.")
    specs = tuple(s if isinstance(s, TensorSpec) else parse_input_spec(s) for s in input_specs)
    sample = example_inputs(specs)
    with torch.no_grad():
        try:
            outputs = module(*(torch.from_numpy(sample[s.name]) for s in specs))
        except Exception as exc:
            raise ModelLoadError(str(path), "it fails on inputs of the declared shapes "
                                 f"({first_line(exc, 200)})",
                                 hint="Check the --input specs.") from None
    return Imported(path=path, format="torchscript",
                    signature=Signature(inputs=specs, outputs=_output_specs(outputs)))


def _program_signature(program: Any) -> Signature:
    torch = _torch("torch.export programs")
    user_inputs = program.graph_signature.user_inputs
    specs, outs = [], []
    nodes = {n.name: n for n in program.graph.nodes}
    for name in user_inputs:
        val = nodes[name].meta.get("val")
        shape = tuple(int(d) if isinstance(d, int) else -1 for d in val.shape)
        specs.append(TensorSpec(name=name, dtype=str(val.dtype).removeprefix("torch."),
                                shape=shape))
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    vals = [a.meta.get("val") for a in torch.utils._pytree.tree_leaves(output_node.args)
            if hasattr(a, "meta")]
    for i, val in enumerate(vals):
        outs.append(TensorSpec(name="output" if len(vals) == 1 else f"output_{i}",
                               dtype=str(val.dtype).removeprefix("torch."),
                               shape=tuple(int(d) if isinstance(d, int) else -1
                                           for d in val.shape)))
    return Signature(inputs=tuple(specs), outputs=tuple(outs))


def load_runnable(path: Path, fmt: str) -> Any:
    """A callable module: TorchScript as loaded, an ExportedProgram's eager module."""
    torch = _torch("Running a PyTorch model")
    if fmt == "pt2":
        return torch.export.load(str(path)).module()
    return torch.jit.load(str(path), map_location="cpu").eval()


def to_onnx(path: Path, fmt: str, signature: Signature, sample: dict[str, np.ndarray],
            out: Path, *, opset: int, exporter: str) -> str:
    """Export with torch.onnx; returns the exporter used. Dynamic axes follow the signature."""
    torch = _torch("Converting PyTorch to ONNX")
    # An ExportedProgram keeps its own dynamic dims; export it as is (its .module() would not).
    module = torch.export.load(str(path)) if fmt == "pt2" else load_runnable(path, fmt)
    args = tuple(torch.from_numpy(np.ascontiguousarray(sample[s.name]))
                 for s in signature.inputs)
    names_in = [s.name for s in signature.inputs]
    names_out = [s.name for s in signature.outputs]
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    if fmt == "pt2":
        order = ["dynamo"]
    errors = []
    for how in order:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if how == "torchscript":
                    axes = {s.name: {i: f"{s.name}_d{i}" for i, d in enumerate(s.shape) if d == -1}
                            for s in (*signature.inputs, *signature.outputs)}
                    torch.onnx.export(module, args, str(out), dynamo=False,
                                      opset_version=opset, input_names=names_in,
                                      output_names=names_out, dynamic_axes=axes)
                else:
                    dims = {s.name: {i: torch.export.Dim.AUTO for i, d in enumerate(s.shape)
                                     if d == -1} for s in signature.inputs}
                    prog = torch.onnx.export(module, args, dynamo=True, opset_version=opset,
                                             input_names=names_in, output_names=names_out,
                                             dynamic_shapes=dims if fmt != "pt2" else None,
                                             external_data=False, verbose=False)
                    prog.save(str(out), external_data=False)
                    _drop_initializer_shapes(out)
            return how
        except Exception as exc:  # exporters raise many types; collect and report them all
            errors.append(f"{how}: {first_line(exc)}")
    raise ConversionError("torch.onnx.export failed: " + " | ".join(errors),
                          hint="Check that the model traces with the example inputs, or pick "
                          "another exporter (exporter: dynamo | torchscript).")


def _drop_initializer_shapes(path: Path) -> None:
    """The dynamo exporter records a value_info shape for every weight. ONNX Runtime's dynamic
    quantizer transposes Gemm weights into MatMul ones and then fails shape inference against
    those stale entries, so they go: a weight's shape is its initializer's anyway."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    kept = [v for v in model.graph.value_info if v.name not in weights]
    if len(kept) != len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
        onnx.save(model, str(path))
