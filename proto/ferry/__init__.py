"""Ferry's wire API: protobuf messages and gRPC services, generated from the .proto files
beside them by ``proto/generate.py``.

- ``ferry.v1``: Ferry's own API (client, worker, KV transfer, events).
- ``ferry.kserve.v2``: the KServe v2 / Open Inference Protocol messages (wire-compatible with
  tritonclient).

This package imports nothing else of Ferry's. It is installed from the ``proto/`` folder under
the name ``ferry`` (never ``proto``: that import name belongs to proto-plus).
"""
