"""The checked-in descriptor set matches the .proto files, and loads beside tritonclient."""

from __future__ import annotations

import pathlib
import subprocess
import sys

PROTO_DIR = pathlib.Path(__file__).parents[2] / "serve" / "proto"


def test_descriptors_are_regenerated(tmp_path: pathlib.Path) -> None:
    from google.protobuf import descriptor_pb2
    from xlaserve.serve.proto.descriptors import FILE_DESCRIPTOR_SET

    out = tmp_path / "set.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_DIR}",
                    f"--descriptor_set_out={out}", "xlaserve/v1/xlaserve.proto",
                    "inference/grpc_service.proto"], check=True)
    fresh = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    checked_in = descriptor_pb2.FileDescriptorSet.FromString(FILE_DESCRIPTOR_SET)
    assert fresh == checked_in, "run `bash serve/proto/regen.sh`"


def test_private_pool_leaves_the_default_pool_alone() -> None:
    import tritonclient.grpc  # noqa: F401 (registers inference.* in the default pool)
    from google.protobuf import descriptor_pool
    from xlaserve.serve.proto.messages import protos

    ps = protos()
    assert ps.kserve.ModelInferRequest.DESCRIPTOR.file.pool is ps.pool
    try:
        descriptor_pool.Default().FindMessageTypeByName("xlaserve.v1.GenerateRequest")
    except KeyError:
        pass
    else:
        raise AssertionError("xlaserve.v1 leaked into the default descriptor pool")


def test_lazy_public_names() -> None:
    from xlaserve import serve

    assert serve.XlaserveClient.__name__ == "XlaserveClient"
    assert serve.ServerOptions(model_name="m").port == 50051


def test_every_sampling_field_is_in_the_proto() -> None:
    from xlaserve.serve.common import SAMPLING_FIELDS
    from xlaserve.serve.native_servicer import sampling_values
    from xlaserve.serve.proto.messages import protos

    msg = protos().native.SamplingParams()
    assert set(msg.DESCRIPTOR.fields_by_name) == set(SAMPLING_FIELDS)
    assert sampling_values(msg) == {}
    msg.temperature = 0.0
    msg.stop.append("x")
    msg.ignore_eos = True
    assert sampling_values(msg) == {"temperature": 0.0, "stop": ("x",), "ignore_eos": True}
    msg.include_stop_str_in_output = True
    assert sampling_values(msg)["include_stop_str_in_output"] is True
    msg.logit_bias[5] = -100.0
    msg.logit_bias[7] = 2.5
    assert sampling_values(msg)["logit_bias"] == {5: -100.0, 7: 2.5}
