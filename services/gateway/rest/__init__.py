"""REST transports of the gateway: the Open Inference Protocol (oip, codec, edge) and the /v1 management API."""
