"""The Open Inference Protocol (KServe V2) over gRPC, with Triton's extensions, so
`tritonclient.grpc` works unchanged: inference.proto (the wire contract), its generated
modules (scripts/gen_grpc.sh), codec.py (messages <-> numpy and dicts) and server.py (the
servicer over the data plane, and `start_grpc`)."""
