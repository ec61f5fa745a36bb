"""A small ONNX Runtime custom runtime for MLServer, written for bench/serving.py.

MLServer has no ONNX runtime of its own; this is what a user would write: one session per
model (one thread, like the agent's), inputs decoded and outputs encoded with MLServer's own
NumpyCodec. It runs inside MLServer's venv (bench/.venv-mlserver, `make bench-mlserver`), never
in the project's: bench/serving.py copies it next to the model settings it writes.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntime(MLModel):
    """An ONNX model in an ONNX Runtime session."""

    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        uri = await get_model_uri(self._settings)
        self.session = ort.InferenceSession(uri, opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {i.name: np.asarray(NumpyCodec.decode_input(i)) for i in payload.inputs}
        results = self.session.run(self.output_names, feeds)
        return InferenceResponse(
            model_name=self.name,
            model_version=self.version,
            outputs=[
                NumpyCodec.encode_output(name, value)
                for name, value in zip(self.output_names, results, strict=True)
            ],
        )
