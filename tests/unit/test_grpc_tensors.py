"""gRPC OIP messages to arrays and back (agent/serving/grpc_tensors.py), and the --grpc setting."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from agent.exceptions import (
    AgentConfigError,
    InferenceInputError,
    InferenceLimitError,
    ModelNotLoaded,
)
from agent.serving.grpc import status_of
from agent.serving.grpc_tensors import (
    answer,
    bearer_token,
    check_outputs,
    parse_infer,
    token_accepted,
)
from agent.serving.proto import grpc_predict_v2_pb2 as pb
from agent.settings import load_file, merge, to_config


def request(arr: np.ndarray, datatype: str, *, raw: bool = True, **kw: Any) -> Any:
    req = pb.ModelInferRequest(**{"model_name": "m", **kw})
    req.inputs.add(name="x", datatype=datatype, shape=arr.shape)
    if raw:
        req.raw_input_contents.append(arr.tobytes())
    return req


@pytest.mark.parametrize(
    "dtype", ["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64"]
)
def test_raw_contents_round_trip_every_datatype(dtype: str) -> None:
    from agent.serving.runtime import DTYPES

    arr = (np.arange(12).reshape(3, 4) % 2).astype(DTYPES[dtype])
    call = parse_infer(request(arr, dtype), max_elements=100)
    np.testing.assert_array_equal(call.feeds["x"], arr)
    assert call.feeds["x"].dtype == arr.dtype
    resp = answer("m", "1", "id", {"y": call.feeds["x"]})
    assert resp.outputs[0].datatype == dtype
    assert list(resp.outputs[0].shape) == [3, 4]
    assert resp.raw_output_contents[0] == arr.tobytes()


def test_raw_contents_are_not_copied() -> None:
    req = request(np.ones((2, 4), np.float32), "FP32")
    x = parse_infer(req, max_elements=100).feeds["x"]
    assert not x.flags.owndata and not x.flags.writeable


@pytest.mark.parametrize(
    ("datatype", "field", "values", "dtype"),
    [
        ("FP32", "fp32_contents", [1.5, -2.0], np.float32),
        ("FP64", "fp64_contents", [1.5, -2.0], np.float64),
        ("INT8", "int_contents", [-128, 127], np.int8),
        ("UINT16", "uint_contents", [0, 65535], np.uint16),
        ("INT64", "int64_contents", [-(2**63), 2**63 - 1], np.int64),
        ("UINT64", "uint64_contents", [0, 2**64 - 1], np.uint64),
        ("BOOL", "bool_contents", [True, False], np.bool_),
    ],
)
def test_typed_contents(datatype: str, field: str, values: list[Any], dtype: Any) -> None:
    req = pb.ModelInferRequest(model_name="m")
    t = req.inputs.add(name="x", datatype=datatype, shape=[2])
    getattr(t.contents, field).extend(values)
    x = parse_infer(req, max_elements=10).feeds["x"]
    assert x.dtype == np.dtype(dtype)
    assert x.tolist() == values


def _refusal(req: Any, max_elements: int = 100) -> str:
    with pytest.raises(InferenceInputError) as err:
        parse_infer(req, max_elements=max_elements)
    return str(err.value)


def test_refusals_name_the_field() -> None:
    ok = np.zeros((2, 4), np.float32)
    short = request(ok, "FP32")
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    assert _refusal(short).startswith("raw_input_contents[0]: 31 bytes for input 'x'")

    assert "inputs[0].datatype" in _refusal(request(ok, "FP8"))
    assert "model_name" in _refusal(pb.ModelInferRequest(inputs=[{"name": "x"}]))
    assert "model_name" in _refusal(request(ok, "FP32", model_name="m" * 1025))
    assert _refusal(pb.ModelInferRequest(model_name="m")) == "inputs: the request has none"
    assert "inputs[0].name" in _refusal(_unnamed())
    assert "id is longer" in _refusal(request(ok, "FP32", id="i" * 2000))

    twice = request(ok, "FP32")
    twice.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    twice.raw_input_contents.append(ok.tobytes())
    assert "inputs[1].name: input 'x' is given twice" in _refusal(twice)

    both = request(ok, "FP32")
    both.inputs[0].contents.fp32_contents.extend([0.0] * 8)
    assert "inputs[0].contents is given with raw_input_contents" in _refusal(both)

    bools = request(np.array([0, 2], np.uint8), "BOOL")
    assert "must be 0 or 1" in _refusal(bools)

    fp16 = request(np.zeros(2, np.float16), "FP16", raw=False)
    fp16.inputs[0].contents.fp32_contents.extend([0.0, 0.0])
    assert "FP16 has no typed contents" in _refusal(fp16)

    narrow = request(np.zeros(2, np.int8), "INT8", raw=False)
    narrow.inputs[0].contents.int_contents.extend([1, 300])
    assert "holds 300, out of range for INT8" in _refusal(narrow)

    wrong = request(np.zeros(2, np.float32), "FP32", raw=False)
    wrong.inputs[0].contents.int_contents.extend([1, 2])
    assert "inputs[0].contents.int_contents does not carry FP32" in _refusal(wrong)

    wanted = request(ok, "FP32", outputs=[{"name": "y"}, {"name": "y"}])
    assert "requested twice" in _refusal(wanted)


def _unnamed() -> Any:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="", datatype="FP32", shape=[1])
    req.raw_input_contents.append(b"\0" * 4)
    return req


def test_element_limit_is_checked_before_anything_is_allocated() -> None:
    req = pb.ModelInferRequest(model_name="m")
    req.inputs.add(name="x", datatype="FP32", shape=[2**40, 2**40])
    with pytest.raises(InferenceLimitError, match="max_request_elements 100"):
        parse_infer(req, max_elements=100)


def test_outputs_chosen_and_limited() -> None:
    outs = {"a": np.zeros(3, np.float32), "b": np.zeros(5, np.int64)}
    assert list(check_outputs(outs, (), max_elements=8)) == ["a", "b"]
    assert list(check_outputs(outs, ("b",), max_elements=5)) == ["b"]
    with pytest.raises(InferenceInputError, match=r"outputs\[0\].name"):
        check_outputs(outs, ("c",), max_elements=8)
    with pytest.raises(InferenceLimitError, match="max_response_elements 7"):
        check_outputs(outs, (), max_elements=7)
    with pytest.raises(TypeError):
        answer("m", "1", "", {"s": np.array(["text"])})


def test_bearer_tokens() -> None:
    token = "t" * 20
    assert bearer_token([("authorization", f"Bearer {token}")]) == token
    assert bearer_token([("Authorization", f"bearer  {token} ")]) == token
    assert bearer_token([("authorization", f"Basic {token}")]) is None
    assert bearer_token([("authorization", "Bearer ")]) is None
    assert bearer_token([("x-other", token)]) is None
    assert token_accepted(token, ["other" * 4, token])
    assert not token_accepted(token + "x", [token])
    assert not token_accepted(None, [token])
    assert not token_accepted(token, [])


def test_status_table() -> None:
    assert status_of(InferenceLimitError("x")) is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(InferenceInputError("x")) is grpc.StatusCode.INVALID_ARGUMENT
    assert status_of(ModelNotLoaded("x")) is grpc.StatusCode.NOT_FOUND
    assert status_of(RuntimeError("x")) is None


def test_grpc_settings(tmp_path: Path) -> None:
    base = {"state_dir": str(tmp_path)}
    off = to_config(merge(base, {}))
    assert off.grpc_host is None
    tokens = tmp_path / "tokens"
    tokens.write_text("# the scraper\n" + "a" * 16 + "\n\n" + "b" * 20 + "\n")
    on = to_config(merge({**base, "grpc": "0.0.0.0:8511", "grpc_token_file": str(tokens)}, {}))
    assert (on.grpc_host, on.grpc_port, on.grpc_tokens) == ("0.0.0.0", 8511, ("a" * 16, "b" * 20))
    # agent.toml: grpc = "HOST:PORT", the command line over it.
    toml = tmp_path / "agent.toml"
    toml.write_text(f'state_dir = "{tmp_path}"\ngrpc = "[::1]:9000"\n')
    from_file = to_config(merge({}, load_file(toml)))
    assert (from_file.grpc_host, from_file.grpc_port) == ("[::1]", 9000)
    over = to_config(merge({"grpc": "127.0.0.1:9001"}, load_file(toml)))
    assert (over.grpc_host, over.grpc_port) == ("127.0.0.1", 9001)
    for bad, fragment in [
        ({"grpc": "nowhere"}, "--grpc (grpc) must be HOST:PORT"),
        ({"grpc": "h:1", "grpc_cert": "c.pem"}, "grpc-cert and grpc-key go together"),
        ({"grpc": "h:1", "grpc_client_ca": "ca.pem"}, "grpc-client-ca needs grpc-cert"),
        ({"grpc": "h:1", "grpc_token_file": str(tmp_path / "none")}, "grpc-token-file"),
    ]:
        with pytest.raises(AgentConfigError, match=re.escape(fragment)):
            to_config(merge({**base, **bad}, {}))
    tokens.write_text("short\n")
    with pytest.raises(AgentConfigError, match="16 or more"):
        to_config(merge({**base, "grpc": "h:1", "grpc_token_file": str(tokens)}, {}))


def test_agent_run_takes_grpc_options(tmp_path: Path) -> None:
    import argparse

    from agent.cli import register
    from agent.settings import SETTINGS

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    tokens = tmp_path / "tokens"
    tokens.write_text("c" * 32 + "\n")
    grpc_flags = ["--grpc-token-file", str(tokens), "--grpc-cert", "s.pem", "--grpc-key", "s.key"]
    args = parser.parse_args(
        ["agent", "run", "--state-dir", str(tmp_path), "--grpc", "127.0.0.1:8511", *grpc_flags]
    )
    cfg = to_config(merge({n: getattr(args, n, None) for n in SETTINGS}, {}))
    assert (cfg.grpc_host, cfg.grpc_port, cfg.grpc_tokens) == ("127.0.0.1", 8511, ("c" * 32,))
    assert (cfg.grpc_cert_file, cfg.grpc_key_file, cfg.grpc_client_ca_file) == (
        "s.pem",
        "s.key",
        None,
    )


def test_grpc_port_takes_the_serve_ports_access_unless_given_its_own(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from agent.serving.grpc import GrpcTls, grpc_tls, grpc_tokens

    plain = AgentConfig(state_dir=tmp_path)
    assert grpc_tls(plain) is None
    assert grpc_tokens(plain) == ()
    serve = AgentConfig(
        state_dir=tmp_path,
        serve_tokens=("s" * 16,),
        serve_cert_file="s.pem",
        serve_key_file="s.key",
        serve_client_ca_file="ca.pem",
    )
    assert grpc_tokens(serve) == ("s" * 16,)
    assert grpc_tls(serve) == GrpcTls(Path("s.pem"), Path("s.key"), Path("ca.pem"))
    own = replace(serve, grpc_tokens=("g" * 16,), grpc_cert_file="g.pem", grpc_key_file="g.key")
    assert grpc_tokens(own) == ("g" * 16,)
    assert grpc_tls(own) == GrpcTls(Path("g.pem"), Path("g.key"), None)
