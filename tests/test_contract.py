"""The wire contract: stubs match the .proto, import on the oldest runtimes we
declare, and the client installs and imports without torch."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from qwen2vl_flux.client.errors import InvalidArgument
from qwen2vl_flux.client.wire import ITEMSIZE, bucket, check_tensor, pad_tokens
from qwen2vl_flux.v1 import qwen2vl_flux_pb2 as pb

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "proto"
STUBS = PROTO_DIR / "qwen2vl_flux" / "v1"


def _lower_bound(requirement_prefix: str) -> tuple[int, ...]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith(requirement_prefix + ">="))
    return tuple(int(x) for x in spec.split(">=")[1].split("."))


def test_committed_stubs_match_the_proto(tmp_path):
    grpc_tools = pytest.importorskip("grpc_tools.protoc")
    from google.protobuf import descriptor_pb2

    rc = grpc_tools.main(["protoc", f"-I{PROTO_DIR}", f"--descriptor_set_out={tmp_path / 'fresh.pb'}",
                          "qwen2vl_flux/v1/qwen2vl_flux.proto"])
    assert rc == 0
    fresh = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "fresh.pb").read_bytes()).file[0]
    _drop_json_names(fresh.message_type)  # protoc adds them to descriptor sets, not to generated code
    committed = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert committed == fresh, "stubs are stale: run proto/generate.sh"

    grpc_stub = (STUBS / "qwen2vl_flux_pb2_grpc.py").read_text()
    for service in fresh.service:
        for method in service.method:
            assert f"/{fresh.package}.{service.name}/{method.name}" in grpc_stub


def _drop_json_names(messages) -> None:
    for message in messages:
        for field in message.field:
            field.ClearField("json_name")
        _drop_json_names(message.nested_type)


def test_stubs_import_on_the_oldest_declared_runtimes():
    grpc_generated = re.search(r"GRPC_GENERATED_VERSION = '([\d.]+)'",
                               (STUBS / "qwen2vl_flux_pb2_grpc.py").read_text()).group(1)
    assert tuple(int(x) for x in grpc_generated.split(".")) <= _lower_bound("grpcio")
    # The GPU image runs grpcio 1.84: stubs from a newer grpcio-tools refuse to import there.
    assert tuple(int(x) for x in grpc_generated.split(".")) <= (1, 84, 0)
    numbers = re.search(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version.Domain.PUBLIC,\s*(\d+),\s*(\d+),"
                        r"\s*(\d+),", (STUBS / "qwen2vl_flux_pb2.py").read_text())
    assert tuple(int(x) for x in numbers.groups()) <= _lower_bound("protobuf")


def test_client_imports_without_torch():
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'diffusers', 'numpy'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import qwen2vl_flux.client, qwen2vl_flux.client.cli, qwen2vl_flux.client.launch\n"
        "from qwen2vl_flux.client import Client, Mode, Focus\n"
        "assert not any(m.split('.')[0] in ('torch', 'transformers', 'diffusers') for m in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_pad_tokens_keeps_valid_rows_and_zero_fills():
    rows = [bytes([i]) * 4 * 3 for i in range(1, 6)]  # 5 tokens of 3 float32-sized cells
    padded = pb.PaddedTensor(tensor=pb.Tensor(dtype=pb.FLOAT32, shape=[1, 5, 3], data=b"".join(rows)),
                             valid_length=5)
    wide = pad_tokens(padded, 8)
    assert list(wide.tensor.shape) == [1, 8, 3] and wide.valid_length == 5
    assert wide.tensor.data[:60] == b"".join(rows) and wide.tensor.data[60:] == bytes(36)
    narrow = pad_tokens(wide, 5)
    assert narrow.tensor.data == padded.tensor.data
    with pytest.raises(InvalidArgument):
        pad_tokens(wide, 4)


def test_tensor_checks_name_the_problem():
    with pytest.raises(InvalidArgument, match="needs 24"):
        check_tensor(pb.Tensor(dtype=pb.BFLOAT16, shape=[3, 4], data=bytes(23)), "t")
    with pytest.raises(InvalidArgument, match="unknown dtype"):
        check_tensor(pb.Tensor(dtype=99, shape=[1], data=bytes(4)), "t")
    assert ITEMSIZE[pb.BFLOAT16] == 2
    assert bucket(1) == 64 and bucket(64) == 64 and bucket(65) == 128
