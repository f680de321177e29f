"""The hand-written peer: the FastAPI tutorial pattern for serving an ONNX model.

    PEER_MODEL=rf|minilm PEER_MODEL_PATH=model.onnx \
        uvicorn fastapi_server:app --app-dir benchmarks/peers --workers 1 --port 8000

What a tutorial user writes: the ONNX Runtime session is created once in `lifespan` with the
default options (intra_op_num_threads=0), an `async def` endpoint takes a pydantic body and
calls `session.run` once per request (directly, on the event loop), and the outputs go back
as nested lists through FastAPI's default JSON response. uvicorn keeps its access log on.

  POST /predict  rf:     {"inputs": [[30 floats], ...]}
                 minilm: {"inputs": {"input_ids": [[...]], "attention_mask": [[...]]}}
  -> {"outputs": {output name: nested list}}
  GET /health    {"ok": true} once the session is loaded
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI
from pydantic import BaseModel

MODEL = os.environ.get("PEER_MODEL", "rf")
MODEL_PATH = os.environ["PEER_MODEL_PATH"]
state: dict = {}


@asynccontextmanager
async def lifespan(app: FastAPI):
    state["session"] = ort.InferenceSession(MODEL_PATH, providers=["CPUExecutionProvider"])
    state["outputs"] = [o.name for o in state["session"].get_outputs()]
    state["input"] = state["session"].get_inputs()[0].name
    yield
    state.clear()


app = FastAPI(lifespan=lifespan)


def _answer(results: list) -> dict:
    return {"outputs": {name: value.tolist() for name, value in zip(state["outputs"], results)}}


if MODEL == "rf":
    class Rows(BaseModel):
        inputs: list[list[float]]

    @app.post("/predict")
    async def predict(body: Rows):
        x = np.asarray(body.inputs, dtype=np.float32)
        return _answer(state["session"].run(None, {state["input"]: x}))

else:
    class Tokens(BaseModel):
        input_ids: list[list[int]]
        attention_mask: list[list[int]]

    class Sentences(BaseModel):
        inputs: Tokens

    @app.post("/predict")
    async def predict(body: Sentences):
        feed = {"input_ids": np.asarray(body.inputs.input_ids, dtype=np.int64),
                "attention_mask": np.asarray(body.inputs.attention_mask, dtype=np.int64)}
        return _answer(state["session"].run(None, feed))


@app.get("/health")
async def health():
    return {"ok": "session" in state}
