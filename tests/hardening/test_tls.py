"""TLS on REST and gRPC, with optional client certificates (issue 16, item 8), driven by real
clients (httpx, tritonclient over gRPC with SSL) against certificates made here with the
`cryptography` package; and the refusal to serve API keys in clear text off loopback."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from optiserve.api import register
from tests.builders import linear_onnx, run_onnx, save_onnx
from tests.server.conftest import free_port

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402


def _write(folder: Path, name: str, key, cert) -> tuple[Path, Path]:
    key_path, cert_path = folder / f"{name}.key", folder / f"{name}.crt"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _cert(subject: str, issuer_key, issuer_name, key, *, ca: bool, usage, san=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                                                   subject)]))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5))
         .not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    folder = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("optiserve test CA", ca_key, None, ca_key, ca=True, usage=None)
    out = {"ca": _write(folder, "ca", ca_key, ca)[1]}
    for name, usage, san in (
            ("server", ExtendedKeyUsageOID.SERVER_AUTH,
             [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            ("client", ExtendedKeyUsageOID.CLIENT_AUTH, None)):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert(name, ca_key, ca.subject, key, ca=False, usage=usage, san=san)
        out[f"{name}_key"], out[name] = _write(folder, name, key, cert)
    return out


def _served(make_server, tmp_path, pki, **tls):
    port = free_port()
    live = make_server(jobs=False, grpc_port=port, tls_cert=pki["server"],
                       tls_key=pki["server_key"], **tls)
    path = save_onnx(linear_onnx(4, 3), tmp_path / "lin.onnx")
    register("lin", path, registry=live.registry)
    return live, port, path


@pytest.mark.slow
def test_rest_and_grpc_over_tls(make_server, tmp_path, pki):
    import tritonclient.grpc as tg

    live, port, path = _served(make_server, tmp_path, pki)
    assert live.url.startswith("https://")
    auth = {"Authorization": f"Bearer {live.admin}"}
    with httpx.Client(base_url=live.url, verify=ssl.create_default_context(
            cafile=str(pki["ca"])), headers=auth) as c:
        assert c.put("/api/v1/deployments/lin", json={"max_batch_size": 8}).status_code == 200
        x = np.arange(8, dtype=np.float32).reshape(2, 4)
        r = c.post("/v2/models/lin/infer", json={"inputs": [
            {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": x.tolist()}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(np.array(r.json()["outputs"][0]["data"]).reshape(2, 3),
                                   run_onnx(path, {"x": x})[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(httpx.HTTPError):  # plain HTTP is not spoken on that port
        httpx.get(live.url.replace("https://", "http://") + "/v2/health/live", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a client that does not trust the CA refuses
        httpx.get(live.url + "/v2/health/live", timeout=5)

    t = tg.InferenceServerClient(f"localhost:{port}", ssl=True,
                                 root_certificates=str(pki["ca"]))
    i = tg.InferInput("x", [2, 4], "FP32")
    i.set_data_from_numpy(x)
    grpc_auth = {"authorization": auth["Authorization"]}  # gRPC metadata keys are lower case
    np.testing.assert_allclose(t.infer("lin", [i], headers=grpc_auth).as_numpy("y"),
                               run_onnx(path, {"x": x})[0], rtol=1e-5, atol=1e-6)
    t.close()


@pytest.mark.slow
def test_client_certificates_are_required_when_a_client_ca_is_set(make_server, tmp_path, pki):
    import tritonclient.grpc as tg
    from tritonclient.utils import InferenceServerException

    live, port, _ = _served(make_server, tmp_path, pki, tls_client_ca=pki["ca"])
    trust = ssl.create_default_context(cafile=str(pki["ca"]))
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake fails
        httpx.get(live.url + "/v2/health/live", verify=trust, timeout=5)
    mutual = ssl.create_default_context(cafile=str(pki["ca"]))
    mutual.load_cert_chain(str(pki["client"]), str(pki["client_key"]))
    assert httpx.get(live.url + "/v2/health/live", verify=mutual, timeout=5).status_code == 200

    bare = tg.InferenceServerClient(f"localhost:{port}", ssl=True,
                                    root_certificates=str(pki["ca"]))
    with pytest.raises(InferenceServerException):
        bare.is_server_live()
    bare.close()
    t = tg.InferenceServerClient(f"localhost:{port}", ssl=True,
                                 root_certificates=str(pki["ca"]),
                                 private_key=str(pki["client_key"]),
                                 certificate_chain=str(pki["client"]))
    assert t.is_server_live()
    t.close()


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optiserve", "serve", *args],
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_keys_off_loopback_without_tls_are_refused_unless_insecure(pki):
    done = _serve("--host", "0.0.0.0", "--port", str(free_port()), "--grpc-port", "0")
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "clear text" in lines[0] and "--tls-cert" in lines[0] \
        and "--insecure" in lines[0], done.stderr
    # a key without its certificate is a mistake named on one line too
    done = _serve("--tls-key", str(pki["server_key"]), "--port", str(free_port()))
    assert done.returncode == 2 and "--tls-cert" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
