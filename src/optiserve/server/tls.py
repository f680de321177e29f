"""TLS for both faces, from one set of settings: the server's certificate and key
(`serve --tls-cert/--tls-key`, OPTISERVE_TLS_CERT/KEY) and, for mutual TLS, the CA that signs
its clients' certificates (`--tls-client-ca`). uvicorn takes them for REST, grpc's
ssl_server_credentials for gRPC.

A server that checks API keys and listens beyond loopback without TLS would take those keys in
clear text: it refuses to start unless told `--insecure` (a proxy in front terminates TLS)."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from optiserve.core.errors import ConfigError
from optiserve.core.settings import Settings

LOOPBACK_NAMES = ("localhost",)


def loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _file(path: Path | None, what: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"The {what} {path} cannot be read ({exc.strerror}).",
                          hint=f"Give a readable PEM file with {option}.") from None


def check(settings: Settings, host: str) -> None:
    """The TLS settings are whole and readable, and keys do not cross the network in clear
    text; a ConfigError (one line, exit 2 on the CLI) otherwise."""
    if bool(settings.tls_cert) != bool(settings.tls_key):
        given, missing = (("--tls-cert", "--tls-key") if settings.tls_cert
                          else ("--tls-key", "--tls-cert"))
        raise ConfigError(f"{given} is given without {missing}.",
                          hint="TLS needs the certificate and its private key (PEM files).")
    if settings.tls_client_ca and not settings.tls_cert:
        raise ConfigError("--tls-client-ca is given without --tls-cert and --tls-key.",
                          hint="Mutual TLS is TLS first: give the server's certificate too.")
    if settings.tls_cert:
        _file(settings.tls_cert, "certificate", "--tls-cert")
        _file(settings.tls_key, "private key", "--tls-key")
        if settings.tls_client_ca:
            _file(settings.tls_client_ca, "client CA bundle", "--tls-client-ca")
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                str(settings.tls_cert), str(settings.tls_key))
        except ssl.SSLError as exc:
            raise ConfigError(f"The TLS certificate and key do not load ({exc.reason}).",
                              hint="Give the PEM certificate and the private key that "
                              "belongs to it.") from None
    elif settings.auth == "on" and not loopback(host) and not settings.insecure:
        raise ConfigError(
            f"Serving on {host} without TLS would take API keys in clear text.",
            hint="Give --tls-cert and --tls-key (OPTISERVE_TLS_CERT/KEY), or, behind a proxy "
            "that terminates TLS, say so with --insecure (OPTISERVE_INSECURE=1).")


def uvicorn_options(settings: Settings) -> dict:
    """uvicorn.Config / uvicorn.run keyword arguments for REST over TLS (empty without)."""
    if not settings.tls_cert:
        return {}
    options = {"ssl_certfile": str(settings.tls_cert), "ssl_keyfile": str(settings.tls_key)}
    if settings.tls_client_ca:
        options |= {"ssl_ca_certs": str(settings.tls_client_ca),
                    "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def grpc_credentials(settings: Settings):
    """grpc server credentials for TLS (None without)."""
    if not settings.tls_cert:
        return None
    import grpc

    ca = settings.tls_client_ca
    return grpc.ssl_server_credentials(
        [(_file(settings.tls_key, "private key", "--tls-key"),
          _file(settings.tls_cert, "certificate", "--tls-cert"))],
        root_certificates=_file(ca, "client CA bundle", "--tls-client-ca") if ca else None,
        require_client_auth=bool(ca))
