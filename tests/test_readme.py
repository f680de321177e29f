"""Every README example runs as written: its ```bash and ```python blocks, in order, in one
fresh folder with a fresh OPTISERVE_HOME, as a newcomer following it would run them.

The rules, all visible here and in README.md:

* A block preceded by `<!-- readme-test: skip (reason) -->` is not run; the reason is printed.
  Only the install commands at the top are skipped (the CI runs them).
* ```text and ```json blocks are output examples and are not run; any other language fails the
  test, so no block is left out silently.
* Each bash block runs in `bash -e -o pipefail` (a failing command fails the test). Variables
  it exports (`export TOKEN=...`) carry over to the blocks after it, as in one terminal, and
  to the Python blocks' environment. `curl` answers an HTTP error with a failure
  (`--fail-with-body`), so a 4xx/5xx is not mistaken for success.
* `. .venv/bin/activate` sources the virtualenv running these tests (the examples run in a
  temporary folder, not in the checkout).
* A line starting `optiserve serve` runs in the background (the README says to leave it
  running and go on in a second terminal), after stopping the server a previous such line
  started; the block waits until `/api/v1/health` answers. Ports 8000 and 8001, in every
  block, become free loopback ports (OPTISERVE_GRPC_PORT too), so the test never collides with
  a server already running here.
* Python blocks run with this interpreter, in the same folder.

The last REST block must show the job `completed`, checked below; every block must exit 0.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
RUN = {"bash", "python"}
OUTPUT = {"text", "json"}
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*\((?P<reason>[^)]+)\)\s*-->\s*$")
FENCE = re.compile(r"^```(?P<lang>[\w+-]*)\s*$")
BLOCK_TIMEOUT_S = 600


def blocks(text: str) -> list[dict]:
    """Fenced blocks of `text`: language, body, first line number, skip reason (or None)."""
    out: list[dict] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        start = i
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"README.md:{start + 1}: the block is never closed"
        prev = next((lines[k] for k in range(start - 1, -1, -1) if lines[k].strip()), "")
        skip = SKIP.match(prev.strip())
        out.append({"lang": m["lang"], "body": "\n".join(lines[start + 1:j]) + "\n",
                    "line": start + 1, "skip": skip["reason"] if skip else None})
        i = j + 1
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_blocks_are_all_accounted_for():
    """Every block is run, skipped with a reason, or an output example: nothing else."""
    found = blocks(README.read_text())
    assert found, "README.md has no code blocks"
    for b in found:
        assert b["lang"] in RUN | OUTPUT, (
            f"README.md:{b['line']}: ```{b['lang']} is neither run (bash, python) nor an "
            f"output example (text, json)")
        assert not (b["skip"] and b["lang"] in OUTPUT), f"README.md:{b['line']}: skip marker "
        "on an output example"
    skipped = [b for b in found if b["skip"]]
    assert len(skipped) == 1 and "install" in skipped[0]["skip"], (
        "only the install commands may be skipped: " + repr([(b["line"], b["skip"])
                                                               for b in skipped]))


PREAMBLE = r"""
set -e -o pipefail
cd "$README_DIR"
[ -f "$README_STATE" ] && . "$README_STATE"
trap 'export -p > "$README_STATE"' EXIT
curl() { command curl --fail-with-body -sS "$@"; echo; }
readme_serve() {
    if [ -f "$README_SERVER_PID" ]; then
        kill "$(cat "$README_SERVER_PID")" 2>/dev/null || true
        while kill -0 "$(cat "$README_SERVER_PID")" 2>/dev/null; do sleep 0.2; done
    fi
    optiserve serve "$@" >> "$README_DIR/serve.log" 2>&1 &
    echo $! > "$README_SERVER_PID"
    for _ in $(seq 120); do
        command curl -sf "http://127.0.0.1:$README_HTTP_PORT/api/v1/health" >/dev/null && return 0
        kill -0 "$(cat "$README_SERVER_PID")" 2>/dev/null || break
        sleep 0.5
    done
    echo "optiserve serve did not come up:"; tail -20 "$README_DIR/serve.log"; return 1
}
"""


def _bash(body: str, venv_activate: str) -> str:
    body = re.sub(r"^(\s*)(optiserve serve\b)", r"\1readme_serve", body, flags=re.M)
    body = re.sub(r"^(\s*)\. \.venv/bin/activate", r"\1. " + shlex.quote(venv_activate), body,
                  flags=re.M)
    return PREAMBLE + body


def _activate_script(folder: Path) -> str:
    """The virtualenv's activate script, or one that puts this interpreter's bin first."""
    script = Path(sys.prefix) / "bin" / "activate"
    if script.is_file():
        return str(script)
    made = folder / "activate"
    made.write_text(f'export PATH={shlex.quote(str(Path(sys.executable).parent))}:"$PATH"\n')
    return str(made)


def _state_env(state: Path, base: dict) -> dict:
    """The environment the last bash block exported (for the Python blocks)."""
    if not state.exists():
        return base
    out = subprocess.run(["bash", "-c", f". {shlex.quote(str(state))}; env -0"],
                         capture_output=True, env=base, check=True).stdout
    return dict(item.split("=", 1) for item in out.decode().split("\0") if "=" in item)


@pytest.mark.slow
def test_readme_examples_run(tmp_path: Path, optiserve_home: Path):
    work = tmp_path / "readme"
    work.mkdir()
    http, grpc = free_port(), free_port()
    state, pidfile = tmp_path / "state.sh", tmp_path / "server.pid"
    env = {**os.environ, "README_DIR": str(work), "README_STATE": str(state),
           "README_SERVER_PID": str(pidfile), "README_HTTP_PORT": str(http),
           "OPTISERVE_GRPC_PORT": str(grpc), "OPTISERVE_HOME": str(optiserve_home)}
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}".rstrip(":")
    activate = _activate_script(tmp_path)
    ran, outputs = [], {}
    try:
        for b in blocks(README.read_text()):
            if b["lang"] not in RUN or b["skip"]:
                if b["skip"]:
                    print(f"README.md:{b['line']}: skipped ({b['skip']})")
                continue
            body = re.sub(r"\b8000\b", str(http), b["body"])
            body = re.sub(r"\b8001\b", str(grpc), body)
            log = tmp_path / f"block-{b['line']}.log"
            started = time.monotonic()
            with log.open("w") as out:
                if b["lang"] == "bash":
                    cmd = ["bash", "-c", _bash(body, activate)]
                    block_env = env
                else:
                    cmd = [sys.executable, "-c", body]
                    block_env = _state_env(state, env)
                try:
                    rc = subprocess.run(cmd, cwd=work, env=block_env, stdout=out,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        timeout=BLOCK_TIMEOUT_S).returncode
                except subprocess.TimeoutExpired:
                    rc = "timeout"
            text = log.read_text(errors="replace")
            outputs[b["line"]] = (b["body"], text)
            print(f"README.md:{b['line']} ({b['lang']}): {time.monotonic() - started:.1f} s")
            assert rc == 0, (f"README.md:{b['line']}: the ```{b['lang']} block failed "
                             f"({rc}):\n{b['body']}\n--- output (last 4000 chars) ---\n"
                             f"{text[-4000:]}")
            ran.append(b["line"])
    finally:
        _stop_server(pidfile)

    all_output = "\n".join(text for _, text in outputs.values())
    assert len(ran) >= 10, f"only {len(ran)} README blocks ran"
    # the REST walk-through ends `completed`, and the churn deployment answers a label
    rest = [text for body, text in outputs.values() if "/api/v1/inference/optimize" in body]
    assert rest and re.search(r'"status":\s*"completed"', rest[0]), rest[:1]
    assert re.search(r'"model_name":\s*"churn"', all_output), "the OIP curl answered no churn"
    assert "status: completed" in all_output  # the CLI tour's optimize


def _stop_server(pidfile: Path) -> None:
    if not pidfile.exists():
        return
    pid = int(pidfile.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    for _ in range(100):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_examples_into_a_file_is_one_readable_line(tmp_path: Path):
    """`optiserve demo --examples` naming a file: one line on stderr, exit 2, no traceback."""
    target = tmp_path / "not-a-folder"
    target.write_text("x")
    cli = Path(sys.executable).parent / "optiserve"
    r = subprocess.run([str(cli) if cli.exists() else "optiserve", "demo", "--examples",
                        str(target)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r
    assert r.stderr.strip() == f"error: --examples {target}: is a file; name a folder to " \
        "write into.", r.stderr
    assert target.read_text() == "x"
