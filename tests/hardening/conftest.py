"""The hardening campaign's fast tier (issue 16): each problem a probe of the running server
found, reproduced against a real server on loopback, so that it stays fixed. The long runs
(thousands of fuzzed requests, kill -9 storms, overload) are benchmarks/hardening.py."""

from tests.server.conftest import make_server, server  # noqa: F401  (fixtures shared here)
from tests.server.test_grpc import serve  # noqa: F401
from tests.server.test_v2_bad_input import bad  # noqa: F401
