"""KServe v2 / Open Inference Protocol messages under the protobuf package ``ferry.kserve.v2``.
``from ferry.kserve.v2 import inference_pb2``; see inference.proto for how a server exposes
them as ``inference.GRPCInferenceService``."""
