"""A worker's network side: its gRPC servers and its publisher on the NATS event plane
(event_publisher.py). Import the submodules directly; this package imports nothing itself so
that using one server does not load the clients of the others."""
