"""Ferry API v1. Import the generated modules directly, e.g.
``from ferry.v1 import client_pb2, client_pb2_grpc``."""
