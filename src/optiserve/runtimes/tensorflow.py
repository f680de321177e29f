"""TensorFlow: the baseline a converted Keras model or SavedModel is measured against.

The model runs as TensorFlow runs it in production: as a graph. A SavedModel through its
serving signature (a graph already); a Keras model as `model(x, training=False)` inside one
tf.function traced for the signature (batch dimension None), which is what `model.predict`
and TF Serving run. Called eagerly, op by op, MobileNetV2 takes about 11x longer at batch 1
(~115 ms against ~10 ms here), and every conversion would claim a speed-up the user's own
TensorFlow never shows. Outputs are numpy arrays keyed by the signature's output names, so
they compare with the ONNX candidates' name for name.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np

from optiserve.convert.tensorflow import (import_tf, keras_caller, load_keras, load_savedmodel,
                                          savedmodel_caller, tensor_specs, unpacked_savedmodel)
from optiserve.runtimes.base import Runtime

log = logging.getLogger(__name__)


def set_threads(tf, threads: int) -> None:
    """Intra-op threads as asked, one inter-op thread (like the ONNX Runtime sessions, so the
    timings compare). TensorFlow takes them only before it first runs anything; a process
    that already ran TensorFlow keeps its setting."""
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # "... cannot be modified after initialization"
        log.debug("TensorFlow is already initialized; its thread settings stay as they are")


class TensorFlowRuntime(Runtime):
    name = "tensorflow"

    def load(self) -> None:
        self.tf = import_tf("Running a TensorFlow model")
        set_threads(self.tf, self.threads)
        self._open = contextlib.ExitStack()
        if self.format == "keras":
            self.model = load_keras(self.path)
            call = keras_caller(self.model, self.signature)
        else:  # savedmodel: the folder stays unpacked while the model is loaded (its assets)
            folder = self._open.enter_context(unpacked_savedmodel(self.path))
            self.model, fn = load_savedmodel(folder, self.path)
            call = savedmodel_caller(fn, self.signature)
        self._call = self.tf.function(call, input_signature=tensor_specs(self.signature))

    def predict(self, inputs, outputs=None):
        wanted = {s.name: s.dtype for s in self.signature.inputs}
        feed = self.feed(inputs, wanted, _cast)
        result = self._call(*(feed[n] for n in wanted))
        names = outputs or [o.name for o in self.signature.outputs]
        return {n: result[n].numpy() for n in names if n in result}

    def unload(self) -> None:
        self.model = self._call = None
        if getattr(self, "_open", None) is not None:
            self._open.close()


def _cast(array: np.ndarray, dtype: str) -> np.ndarray:
    if dtype in ("str", "object"):
        return np.asarray(array, dtype=object)
    return np.ascontiguousarray(array, dtype=dtype)
