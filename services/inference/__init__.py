"""Inference node: the Open Inference Protocol server (gRPC) over ONNX Runtime and TensorRT.

- `tensors`: the protocol codec (datatypes ↔ numpy); `backends`: execution engines;
- `batcher`, `stats`: dynamic batching, statistics and metrics of one model version;
- `dataplane`: loaded models and the request path, shared by transports;
- `servicer`: the gRPC transport; `repository`: standalone model directories;
- `node`: mesh mode (etcd registration, assignments, artifact cache); `app`: the composition root.
"""
