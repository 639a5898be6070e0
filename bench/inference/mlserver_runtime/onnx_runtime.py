"""A minimal ONNX Runtime runtime for MLServer 1.7 (the peer server in bench/inference).

Runs inside MLServer's own virtualenv, never in the AIMaaS environment: it imports `mlserver`.
`load()` opens an `onnxruntime.InferenceSession` on the model-settings `parameters.uri`;
`predict()` decodes every request input with `NumpyCodec`, runs the session, and encodes every
model output (or only the requested ones) with `NumpyCodec`. Nothing else: no batching, no
custom thread settings (ONNX Runtime defaults, as the AIMaaS node uses by default).
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse
from mlserver.utils import get_model_uri


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = await get_model_uri(self._settings, wellknown_filenames=["model.onnx"])
        self._session = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self._output_names = [output.name for output in self._session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {request_input.name: NumpyCodec.decode_input(request_input) for request_input in payload.inputs}
        wanted = [output.name for output in payload.outputs] if payload.outputs else self._output_names
        results = self._session.run(wanted, feeds)
        return InferenceResponse(
            id=payload.id,
            model_name=self.name,
            model_version=self.version,
            outputs=[NumpyCodec.encode_output(name, np.asarray(value)) for name, value in zip(wanted, results)],
        )
