"""Third-party chatter stays off the terminal: real CLI runs (their captured stdout and stderr,
as a terminal would show them) on tiny models, and the same chatter found in the debug log.

Each line checked here was printed by a real run before core/quiet.py routed it: TensorFlow's
absl lines at import, the TFLite converter's `fully_quantize: ...` and LiteRT's XNNPACK INFO
(C++, straight to fd 2), ONNX Runtime's `ort_format_model.utils [INFO]`, torch.onnx's opset
and torchvision warnings, onnxscript's version-converter fallback and transformers'
`loss_type` warning (Python loggers)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tests.cli.test_cli import cli

pytestmark = pytest.mark.integration

NOISE = ("oneDNN", "absl::InitializeLog", "fully_quantize", "inference_type", "XNNPACK",
         "ort_format_model", "[INFO]", "Setting ONNX exporter", "torchvision is not installed",
         "version conversion is not supported", "loss_type")


def _quiet(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr
    heard = [n for n in NOISE if n in proc.stdout or n in proc.stderr]
    assert not heard, f"{heard} reached the terminal:\n{proc.stderr}\n{proc.stdout}"
    assert proc.stderr.strip() == "", proc.stderr  # nothing at all on stderr


@pytest.mark.slow
def test_tflite_int8_export_prints_only_its_report(tmp_path, optiserve_home):
    pytest.importorskip("ai_edge_litert")
    keras = pytest.importorskip("keras")
    keras.utils.set_random_seed(0)
    inp = keras.Input((8, 8, 1), name="pixels")
    h = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3, activation="relu")(inp))
    keras.Model(inp, keras.layers.Dense(3)(h)).save(tmp_path / "tiny.keras")
    np.savez(tmp_path / "check.npz",
             pixels=np.random.default_rng(0).random((16, 8, 8, 1), dtype=np.float32))
    _quiet(cli("register", "tiny", str(tmp_path / "tiny.keras"), home=optiserve_home))
    proc = cli("export", "tiny", "--format", "tflite", "-O", "quantization=int8", "--data",
               str(tmp_path / "check.npz"), "--iterations", "3", "--batch-sizes", "1",
               home=optiserve_home)
    _quiet(proc)
    assert "registered tiny:2 (tflite" in proc.stdout  # the report itself is still there


@pytest.mark.slow
def test_ort_export_of_a_torch_export_program_prints_only_its_report(tmp_path, optiserve_home):
    """A .pt2 goes through torch.onnx's dynamo exporter (opset and torchvision warnings), then
    onnxruntime.tools writes the operator config (its INFO line)."""
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3)).eval()
    program = torch.export.export(net, (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, tmp_path / "net.pt2")
    _quiet(cli("register", "net", str(tmp_path / "net.pt2"), home=optiserve_home))
    proc = cli("export", "net", "--format", "ort", "--iterations", "3", "--batch-sizes", "1",
               home=optiserve_home)
    _quiet(proc)
    assert "registered net:2 (ort" in proc.stdout and "dynamo exporter" in proc.stdout


SCRIPT = textwrap.dedent("""
    import logging, sys
    # optiserve's log at DEBUG into a file; any other logger keeps Python's default (its
    # warnings go to stderr), as in the CLI
    handler = logging.FileHandler(sys.argv[1])
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s %(message)s"))
    logging.getLogger("optiserve").addHandler(handler)
    logging.getLogger("optiserve").setLevel(logging.DEBUG)
    import numpy as np, onnx, torch, transformers
    from onnx import helper
    import optiserve

    class Embedder(torch.nn.Module):
        def __init__(self, encoder):
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids, attention_mask):
            return self.encoder(input_ids=input_ids,
                                attention_mask=attention_mask).last_hidden_state[:, 0]

    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32)
    ids = torch.randint(1, 50, (2, 8))
    optiserve.register("bert", Embedder(transformers.BertModel(cfg)),
                       example_inputs=(ids, torch.ones_like(ids)))

    # what torch.onnx's dynamo exporter does when it converts opset 18 down: onnxscript's
    # converter cannot, and falls back to the ONNX C API, saying so
    from onnxscript import version_converter
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", 1, [1])],
                              [helper.make_tensor_value_info("y", 1, [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    version_converter.convert_version(model, 17, fallback=True)
    print("done")
""")


@pytest.mark.slow
def test_python_library_warnings_go_to_the_debug_log(tmp_path):
    """transformers' loss_type warning (tracing a BERT at register) and onnxscript's fallback
    line: off the terminal, in the debug log as optiserve.third_party records."""
    pytest.importorskip("transformers")
    pytest.importorskip("onnxscript")
    log = tmp_path / "debug.log"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(log)], capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "OPTISERVE_HOME": str(tmp_path / "h")})
    assert proc.stdout.strip() == "done", proc.stderr
    _quiet(proc)
    debug = [ln for ln in log.read_text().splitlines()
             if ln.startswith("DEBUG optiserve.third_party ")]
    assert any("transformers.modeling_utils: `loss_type=None`" in ln for ln in debug), debug
    assert any("onnxscript.version_converter: The model version conversion is not supported"
               in ln for ln in debug), debug


def test_fd_to_log_catches_what_is_written_to_fd_2(capfd, caplog):
    """What C++ writes straight to fd 2 (os.write here, below Python's sys.stderr) is caught
    and logged at DEBUG; fd 2 is the terminal again afterwards; `once` catches only once."""
    from optiserve.core.quiet import fd_to_log

    caplog.set_level("DEBUG", logger="optiserve.third_party")
    with fd_to_log("lib"):
        os.write(2, b"INFO: Created delegate\n\x1b[2Kstatus: 0\n")
    os.write(2, b"after\n")
    for _ in range(2):
        with fd_to_log("lib", once="test-once-key"):
            os.write(2, b"printed once per process\n")
    out = capfd.readouterr()
    assert out.err == "after\nprinted once per process\n"
    assert [r.getMessage() for r in caplog.records] == [
        "lib: INFO: Created delegate", "lib: status: 0", "lib: printed once per process"]
    assert all(r.levelname == "DEBUG" for r in caplog.records)
