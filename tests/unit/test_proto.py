"""The generated API code (proto/ferry): up to date with the .proto files, importable as
``ferry.*`` without any top-level ``proto`` module, stable field numbers, and working gRPC
stubs."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from concurrent import futures
from pathlib import Path

import google.protobuf
import grpc
import pytest
from google.protobuf import descriptor

from ferry.kserve.v2 import inference_pb2
from ferry.v1 import (
    client_pb2,
    client_pb2_grpc,
    common_pb2,
    events_pb2,
    worker_pb2,
    worker_pb2_grpc,
)

PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
V1_MODULES = (common_pb2, client_pb2, worker_pb2, events_pb2)
GENERATED_MODULES = (
    "ferry.v1.common_pb2", "ferry.v1.client_pb2", "ferry.v1.client_pb2_grpc",
    "ferry.v1.worker_pb2", "ferry.v1.worker_pb2_grpc", "ferry.v1.events_pb2",
    "ferry.kserve.v2.inference_pb2", "ferry.kserve.v2.inference_pb2_grpc",
)


def _load_generate_script():
    spec = importlib.util.spec_from_file_location("ferry_proto_generate",
                                                  PROTO_ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_python(code: str, *path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter whose import path starts with ``path``."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in path)}
    return subprocess.run([sys.executable, "-c", code], check=False, env=env, cwd=path[0],
                          capture_output=True, text=True, timeout=60)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


# --- generated code matches the .proto files ------------------------------------------------

def test_committed_code_equals_a_fresh_generation():
    generate = _load_generate_script()
    assert generate.differences() == []


def test_every_proto_has_its_three_generated_files_and_packages():
    generate = _load_generate_script()
    protos = generate.proto_files()
    assert protos == ["ferry/kserve/v2/inference.proto", "ferry/v1/client.proto",
                      "ferry/v1/common.proto", "ferry/v1/events.proto", "ferry/v1/worker.proto"]
    expected = sorted(p[: -len(".proto")] + suffix
                      for p in protos for suffix in generate.GENERATED_SUFFIXES)
    assert generate.generated_files(PROTO_ROOT) == expected
    for package in ("ferry", "ferry/v1", "ferry/kserve", "ferry/kserve/v2"):
        assert (PROTO_ROOT / package / "__init__.py").is_file(), package
    # proto/ itself must never become an importable package named `proto`.
    assert not (PROTO_ROOT / "__init__.py").exists()


def test_generator_refuses_another_grpcio_tools_version(monkeypatch):
    generate = _load_generate_script()
    monkeypatch.setattr(generate, "GRPC_TOOLS_VERSION", "0.0.1")
    with pytest.raises(RuntimeError, match=r"grpcio-tools==0\.0\.1"):
        generate.check_generator_version()


# --- runtime requirements and import names --------------------------------------------------

def test_protobuf_runtime_is_6x_and_new_enough_for_the_generated_code():
    runtime = _version(google.protobuf.__version__)
    assert (6, 30) <= runtime < (7,), google.protobuf.__version__
    for path in sorted(PROTO_ROOT.rglob("*_pb2.py")):
        header = re.search(r"^# Protobuf Python Version: (\S+)$", path.read_text(), re.MULTILINE)
        assert header, f"{path} has no protobuf version header"
        gencode = _version(header.group(1))
        assert gencode[0] == 6 and gencode <= runtime, (path.name, header.group(1))


def test_generated_modules_import_as_ferry_without_a_top_level_proto_module():
    code = (
        "import importlib, sys\n"
        "sys.modules['proto'] = None  # any `import proto` now raises ImportError\n"
        f"for name in {GENERATED_MODULES!r}:\n"
        "    module = importlib.import_module(name)\n"
        "    assert module.__name__ == name\n"
        "import ferry\n"
        "print(ferry.__file__)\n"
    )
    done = _run_python(code, PROTO_ROOT)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == PROTO_ROOT / "ferry" / "__init__.py"
    imports_proto = re.compile(r"^\s*(import|from) proto\b", re.MULTILINE)
    for path in PROTO_ROOT.rglob("*.py"):
        assert not imports_proto.search(path.read_text()), path


def test_repository_root_on_sys_path_does_not_shadow_proto_plus():
    if importlib.util.find_spec("proto") is None:
        pytest.skip("proto-plus is not installed")
    code = "import proto; print(proto.__file__); print(hasattr(proto, 'Message'))"
    done = _run_python(code, PROTO_ROOT.parent, PROTO_ROOT)
    assert done.returncode == 0, done.stderr
    origin, has_message = done.stdout.split()
    assert has_message == "True"
    assert not Path(origin).is_relative_to(PROTO_ROOT)


# --- the schema ----------------------------------------------------------------------------

# Field numbers are wire format: renumbering or reusing one breaks every peer. New fields may
# be added (with new numbers); a removed field must be marked `reserved` in its .proto.
PINNED_FIELDS = {
    "SamplingParams": "max_tokens=1 temperature=2 top_p=3 top_k=4 seed=5 stop=6 "
                      "stop_token_ids=7 ignore_eos=8",
    "Usage": "prompt_tokens=1 completion_tokens=2 cached_tokens=3",
    "Error": "code=1 message=2",
    "ChatMessage": "role=1 content=2",
    "ChatMessages": "messages=1",
    "TokenIds": "ids=1",
    "GenerateRequest": "model=1 text=2 chat=3 token_ids=4 sampling=5 request_id=6",
    "GenerateResponse": "request_id=1 token_ids=2 text=3 finish_reason=4 usage=5 error=6",
    "TokenizeRequest": "model=1 text=2 chat=3 add_generation_prompt=4",
    "TokenizeResponse": "token_ids=1 prompt=2",
    "ModelCard": "name=1 max_model_len=2 num_ready_workers=3",
    "ListModelsResponse": "models=1",
    "HealthResponse": "ready=1 num_ready_workers=2 detail=3",
    "WorkerGenerateRequest": "request_id=1 prompt_token_ids=2 sampling=3 prefill_only=4 "
                             "remote_prefill=5",
    "WorkerGenerateResponse": "request_id=1 new_token_ids=2 finished=3 finish_reason=4 "
                              "num_prompt_tokens=5 num_cached_tokens=6 error=7 kv_handle=8",
    "AbortRequest": "request_id=1",
    "AbortResponse": "found=1",
    "StatsResponse": "worker_id=1 num_waiting=2 num_running=3 kv_blocks_used=4 "
                     "kv_blocks_total=5 active_prefill_tokens=6 prefix_hit_tokens=7 "
                     "prefix_query_tokens=8 integrity_ok=9 integrity_detail=10",
    "InfoResponse": "worker_id=1 model=2 role=3 block_size=4 hash_seed=5 num_blocks=6 "
                    "max_model_len=7 vocab_size=8",
    "KvHandle": "handle_id=1 worker_id=2 block_ids=3 block_hashes=4 num_tokens=5 "
                "transport_address=6 block_size=7",
    "PullRequest": "handle_id=1 block_ids=2",
    "KvChunk": "block_id=1 layer_start=2 layer_end=3 data=4 crc32=5 error=6",
    "ReleaseHandleRequest": "handle_id=1",
    "ReleaseHandleResponse": "released=1",
    "BlockStored": "block_hashes=1 parent_hash=2",
    "BlockRemoved": "block_hashes=1",
    "KvEvent": "stored=1 removed=2 cleared=3",
    "KvEventBatch": "worker_id=1 seq=2 timestamp=3 events=4",
    "LoadReport": "worker_id=1 timestamp=2 waiting=3 running=4 kv_blocks_used=5 "
                  "kv_blocks_total=6 active_prefill_tokens=7 active_decode_blocks=8",
    "WorkerRegistration": "worker_id=1 address=2 role=3 block_size=4 hash_seed=5 model=6",
}
PINNED_ENUMS = {
    "FinishReason": "FINISH_REASON_UNSPECIFIED=0 FINISH_REASON_STOP=1 FINISH_REASON_LENGTH=2 "
                    "FINISH_REASON_ABORT=3 FINISH_REASON_ERROR=4",
    "WorkerRole": "WORKER_ROLE_UNSPECIFIED=0 WORKER_ROLE_AGGREGATED=1 WORKER_ROLE_PREFILL=2 "
                  "WORKER_ROLE_DECODE=3",
}


def _v1_message(name: str) -> descriptor.Descriptor:
    for module in V1_MODULES:
        if name in module.DESCRIPTOR.message_types_by_name:
            return module.DESCRIPTOR.message_types_by_name[name]
    raise KeyError(name)


@pytest.mark.parametrize("name", sorted(PINNED_FIELDS))
def test_field_numbers_are_pinned(name):
    fields = {f.name: f.number for f in _v1_message(name).fields}
    for pair in PINNED_FIELDS[name].split():
        field, number = pair.split("=")
        assert fields.get(field) == int(number), f"{name}.{field} must stay number {number}"


def test_enum_numbers_are_pinned():
    for name, pinned in PINNED_ENUMS.items():
        values = {v.name: v.number for v in common_pb2.DESCRIPTOR.enum_types_by_name[name].values}
        assert values == {k: int(v) for k, v in (p.split("=") for p in pinned.split())}


def test_error_codes_equal_the_grpc_status_codes_of_the_same_name():
    values = common_pb2.ErrorCode.DESCRIPTOR.values
    assert len(values) == 9
    for value in values:
        name = value.name.removeprefix("ERROR_CODE_")
        status = grpc.StatusCode.OK if name == "UNSPECIFIED" else grpc.StatusCode[name]
        assert status.value[0] == value.number, value.name


def test_packages_and_services():
    for module in V1_MODULES:
        assert module.DESCRIPTOR.package == "ferry.v1"
    assert inference_pb2.DESCRIPTOR.package == "ferry.kserve.v2"
    kinds = {}
    for module in (client_pb2, worker_pb2, inference_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                kinds[f"{service.full_name}.{m.name}"] = (
                    m.input_type.name, m.output_type.name, m.client_streaming, m.server_streaming)
    assert kinds == {
        "ferry.v1.Ferry.Generate": ("GenerateRequest", "GenerateResponse", False, True),
        "ferry.v1.Ferry.Tokenize": ("TokenizeRequest", "TokenizeResponse", False, False),
        "ferry.v1.Ferry.ListModels": ("ListModelsRequest", "ListModelsResponse", False, False),
        "ferry.v1.Ferry.Health": ("HealthRequest", "HealthResponse", False, False),
        "ferry.v1.Worker.Generate": ("WorkerGenerateRequest", "WorkerGenerateResponse",
                                     False, True),
        "ferry.v1.Worker.GenerateStream": ("GenerateStreamRequest", "GenerateStreamResponse",
                                           True, True),
        "ferry.v1.Worker.Abort": ("AbortRequest", "AbortResponse", False, False),
        "ferry.v1.Worker.Stats": ("StatsRequest", "StatsResponse", False, False),
        "ferry.v1.Worker.Info": ("InfoRequest", "InfoResponse", False, False),
        "ferry.v1.KvTransfer.PullBlocks": ("PullRequest", "KvChunk", False, True),
        "ferry.v1.KvTransfer.ReleaseHandle": ("ReleaseHandleRequest", "ReleaseHandleResponse",
                                              False, False),
        "ferry.kserve.v2.GRPCInferenceService.ServerLive":
            ("ServerLiveRequest", "ServerLiveResponse", False, False),
        "ferry.kserve.v2.GRPCInferenceService.ServerReady":
            ("ServerReadyRequest", "ServerReadyResponse", False, False),
        "ferry.kserve.v2.GRPCInferenceService.ModelReady":
            ("ModelReadyRequest", "ModelReadyResponse", False, False),
        "ferry.kserve.v2.GRPCInferenceService.ServerMetadata":
            ("ServerMetadataRequest", "ServerMetadataResponse", False, False),
        "ferry.kserve.v2.GRPCInferenceService.ModelMetadata":
            ("ModelMetadataRequest", "ModelMetadataResponse", False, False),
        "ferry.kserve.v2.GRPCInferenceService.ModelInfer":
            ("ModelInferRequest", "ModelInferResponse", False, False),
        "ferry.kserve.v2.GRPCInferenceService.ModelStreamInfer":
            ("ModelInferRequest", "ModelStreamInferResponse", True, True),
    }


# --- message behaviour ----------------------------------------------------------------------

def test_prompt_oneof_and_optional_presence():
    request = client_pb2.GenerateRequest(model="m", text="hello")
    assert request.WhichOneof("prompt") == "text"
    request.token_ids.ids.extend([5, 6, 7])
    assert request.WhichOneof("prompt") == "token_ids" and request.text == ""
    assert not request.HasField("request_id") and not request.sampling.HasField("seed")
    request.sampling.seed = 0
    request.sampling.temperature = 0.0
    parsed = client_pb2.GenerateRequest.FromString(request.SerializeToString())
    assert parsed.sampling.HasField("seed") and parsed.sampling.seed == 0
    assert parsed.sampling.HasField("temperature") and not parsed.sampling.HasField("top_p")
    assert list(parsed.token_ids.ids) == [5, 6, 7]


def test_kv_events_round_trip_full_64_bit_hashes():
    top = 2**64 - 1
    batch = events_pb2.KvEventBatch(worker_id="w0", seq=7, timestamp=12.5, events=[
        events_pb2.KvEvent(stored=events_pb2.BlockStored(block_hashes=[top, 1])),
        events_pb2.KvEvent(stored=events_pb2.BlockStored(block_hashes=[3], parent_hash=0)),
        events_pb2.KvEvent(removed=events_pb2.BlockRemoved(block_hashes=[top])),
        events_pb2.KvEvent(cleared=events_pb2.AllBlocksCleared()),
    ])
    parsed = events_pb2.KvEventBatch.FromString(batch.SerializeToString())
    assert [e.WhichOneof("event") for e in parsed.events] == ["stored", "stored", "removed",
                                                            "cleared"]
    first, second = parsed.events[0].stored, parsed.events[1].stored
    assert list(first.block_hashes) == [top, 1] and not first.HasField("parent_hash")
    assert second.HasField("parent_hash") and second.parent_hash == 0
    assert list(parsed.events[2].removed.block_hashes) == [top]
    assert (parsed.worker_id, parsed.seq, parsed.timestamp) == ("w0", 7, 12.5)
    with pytest.raises(ValueError):
        events_pb2.BlockRemoved(block_hashes=[2**64])


# --- the generated gRPC code works end to end ------------------------------------------------

class _Frontend(client_pb2_grpc.FerryServicer):
    def Generate(self, request, context):
        ids = list(request.token_ids.ids)
        yield client_pb2.GenerateResponse(request_id=request.request_id, token_ids=ids[:1])
        yield client_pb2.GenerateResponse(
            request_id=request.request_id, token_ids=ids[1:],
            finish_reason=common_pb2.FINISH_REASON_LENGTH,
            usage=common_pb2.Usage(prompt_tokens=len(ids), completion_tokens=len(ids)))


class _Worker(worker_pb2_grpc.WorkerServicer):
    def Abort(self, request, context):
        return worker_pb2.AbortResponse(found=request.request_id == "r1")


def test_generated_stubs_serve_a_stream_and_a_unary_call():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    client_pb2_grpc.add_FerryServicer_to_server(_Frontend(), server)
    worker_pb2_grpc.add_WorkerServicer_to_server(_Worker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = client_pb2.GenerateRequest(request_id="r1",
                                                 token_ids=client_pb2.TokenIds(ids=[4, 5, 6]))
            chunks = list(client_pb2_grpc.FerryStub(channel).Generate(request, timeout=10))
            assert [list(c.token_ids) for c in chunks] == [[4], [5, 6]]
            assert [c.finish_reason for c in chunks] == [common_pb2.FINISH_REASON_UNSPECIFIED,
                                                         common_pb2.FINISH_REASON_LENGTH]
            assert chunks[-1].usage.prompt_tokens == 3
            worker = worker_pb2_grpc.WorkerStub(channel)
            assert worker.Abort(worker_pb2.AbortRequest(request_id="r1"), timeout=10).found
            assert not worker.Abort(worker_pb2.AbortRequest(request_id="r2"), timeout=10).found
            with pytest.raises(grpc.RpcError) as raised:  # not implemented by _Worker
                worker.Stats(worker_pb2.StatsRequest(), timeout=10)
            assert raised.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        server.stop(None)
