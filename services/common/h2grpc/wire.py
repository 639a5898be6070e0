"""HTTP/2 (RFC 9113) frames and the header encoding this server sends (RFC 7541), and gRPC's message
framing and header values (grpc/doc/PROTOCOL-HTTP2.md): the parts that are pure byte work."""

from __future__ import annotations

import base64
import math
import struct
import urllib.parse
import zlib

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types.
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS identifiers.
SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_ENABLE_PUSH = 0x2
SETTINGS_MAX_CONCURRENT_STREAMS = 0x3
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
SETTINGS_MAX_FRAME_SIZE = 0x5
SETTINGS_MAX_HEADER_LIST_SIZE = 0x6

# Error codes.
NO_ERROR = 0x0
PROTOCOL_ERROR = 0x1
INTERNAL_ERROR = 0x2
FLOW_CONTROL_ERROR = 0x3
STREAM_CLOSED = 0x5
FRAME_SIZE_ERROR = 0x6
REFUSED_STREAM = 0x7
CANCEL = 0x8
COMPRESSION_ERROR = 0x9
ENHANCE_YOUR_CALM = 0xB

DEFAULT_WINDOW = 65_535
DEFAULT_MAX_FRAME = 16_384
MAX_WINDOW = 2**31 - 1

_U32 = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">HBBBI")  # a 24-bit length as a 16-bit and an 8-bit part


class ConnectionError_(Exception):  # noqa: N801 - not the builtin ConnectionError
    """A connection error (RFC 9113 §5.4.1): GOAWAY with this code, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    length = len(payload)
    return _FRAME_HEAD.pack(length >> 8, length & 0xFF, kind, flags, stream_id) + payload


def settings_frame(settings: dict[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", key, value) for key, value in settings.items()))


def window_update(stream_id: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment))


def rst_stream(stream_id: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream_id, _U32.pack(code))


def goaway(last_stream_id: int, code: int, debug: bytes = b"") -> bytes:
    return frame(GOAWAY, 0, 0, _U32.pack(last_stream_id) + _U32.pack(code) + debug)


def parse_settings(payload: bytes) -> list[tuple[int, int]]:
    if len(payload) % 6:
        raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS length is not a multiple of 6")
    return [struct.unpack_from(">HI", payload, offset) for offset in range(0, len(payload), 6)]


def unpad(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise ConnectionError_(PROTOCOL_ERROR, "padding exceeds the frame")
    return payload[1 : len(payload) - payload[0]]


# -- header encoding (literal fields without indexing: no dynamic table state to keep in step) ----


def _integer(value: int, prefix_bits: int, first_byte: int = 0) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first_byte | value,))
    out = bytearray((first_byte | limit,))
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(value: bytes) -> bytes:
    return _integer(len(value), 7) + value


# Static table indexes (RFC 7541 Appendix A) of the names we send often.
_STATIC_NAME = {b":authority": 1, b":path": 4, b":status": 8, b"content-type": 31, b"user-agent": 58}


def literal(name: bytes, value: bytes) -> bytes:
    """One header field, literal without indexing (RFC 7541 §6.2.2)."""
    index = _STATIC_NAME.get(name)
    if index is not None:
        return _integer(index, 4) + _string(value)
    return b"\x00" + _string(name) + _string(value)


STATUS_200 = b"\x88"  # indexed field 8 of the static table: ":status: 200"
RESPONSE_HEAD = STATUS_200 + literal(b"content-type", b"application/grpc")
TRAILER_OK = literal(b"grpc-status", b"0")


def header_frames(stream_id: int, block: bytes, end_stream: bool, max_frame: int) -> bytes:
    """A header block as HEADERS (+ CONTINUATION frames when it exceeds the peer's frame size)."""
    flags = END_STREAM if end_stream else 0
    if len(block) <= max_frame:
        return frame(HEADERS, flags | END_HEADERS, stream_id, block)
    frames = [frame(HEADERS, flags, stream_id, block[:max_frame])]
    for offset in range(max_frame, len(block), max_frame):
        last = offset + max_frame >= len(block)
        frames.append(frame(CONTINUATION, END_HEADERS if last else 0, stream_id, block[offset:offset + max_frame]))
    return b"".join(frames)


def status_only(code: int) -> bytes:
    """A non-200 response head (an HTTP-level refusal, before any gRPC exchange)."""
    return literal(b":status", str(code).encode())


# -- gRPC header values ---------------------------------------------------------------------------

_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


def parse_timeout(value: bytes) -> float:
    """grpc-timeout (`1*8DIGIT unit`) in seconds; ValueError when malformed."""
    unit = _TIMEOUT_UNITS.get(value[-1:])
    digits = value[:-1]
    if unit is None or not digits or len(digits) > 8 or not digits.isdigit():
        raise ValueError(f"malformed grpc-timeout {value!r}")
    return int(digits) * unit


def format_timeout(seconds: float) -> bytes:
    """A grpc-timeout value: the finest unit whose count fits in 8 digits, rounded up."""
    for unit, size in ((b"n", 1e-9), (b"u", 1e-6), (b"m", 1e-3), (b"S", 1.0), (b"M", 60.0)):
        count = math.ceil(max(seconds, 0.0) / size)
        if count < 100_000_000:
            return str(count).encode() + unit
    return str(min(math.ceil(seconds / 3600.0), 99_999_999)).encode() + b"H"


def messages(buffer: bytearray, payload: bytes, limit: int, encoding: bytes | None):
    """The complete gRPC messages (5-byte prefix, then the message) that `payload` finishes, after
    the unfinished one `buffer` holds; `buffer` keeps what is left. OverflowError for a message over
    `limit`, ValueError for a bad flag or an unreadable compressed message (raised in order)."""
    if not buffer and len(payload) >= 5 and payload[0] == 0 \
            and int.from_bytes(payload[1:5], "big") == len(payload) - 5 and len(payload) - 5 <= limit:
        yield payload[5:]  # the common case: one whole uncompressed message per frame
        return
    buffer += payload
    while len(buffer) >= 5:
        length = int.from_bytes(buffer[1:5], "big")
        if length > limit:
            raise OverflowError(f"received message larger than max ({length} vs. {limit})")
        if len(buffer) < 5 + length:
            return
        flag = buffer[0]
        message = bytes(buffer[5:5 + length])
        del buffer[:5 + length]
        if flag == 1:
            message = decompress(encoding, message, limit)
        elif flag != 0:
            raise ValueError(f"invalid message flag {flag}")
        yield message


def decompress(encoding: bytes | None, message: bytes, limit: int) -> bytes:
    """A compressed message (flag 1) in its `grpc-encoding`: ValueError when it cannot be read,
    OverflowError when it inflates past `limit` bytes."""
    if encoding == b"gzip":
        decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    elif encoding == b"deflate":
        decompressor = zlib.decompressobj()
    else:
        raise ValueError("a compressed message without a supported grpc-encoding")
    try:
        out = decompressor.decompress(message, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"cannot decompress the message: {exc}") from exc
    if len(out) > limit:
        raise OverflowError(f"received message larger than max (more than {limit} bytes decompressed)")
    return out


def encode_grpc_message(message: str) -> bytes:
    """Percent-encode a status message: UTF-8, with bytes outside printable ASCII and '%' escaped."""
    raw = message.encode("utf-8", "replace")
    if all(0x20 <= byte <= 0x7E and byte != 0x25 for byte in raw):
        return raw
    return b"".join(bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte for byte in raw)


def decode_grpc_message(value: bytes) -> str:
    """A percent-encoded grpc-message as text (undecodable bytes replaced, never an error)."""
    return urllib.parse.unquote_to_bytes(value).decode("utf-8", "replace") if b"%" in value \
        else value.decode("utf-8", "replace")


def metadata_value(key: str, value: str | bytes) -> bytes:
    """A metadata value on the wire: `-bin` keys carry base64 (unpadded), others printable ASCII."""
    if key.endswith("-bin"):
        raw = value if isinstance(value, bytes) else value.encode()
        return base64.b64encode(raw).rstrip(b"=")
    text = value.decode() if isinstance(value, bytes) else value
    encoded = text.encode("ascii")
    if any(byte < 0x20 or byte > 0x7E for byte in encoded):
        raise ValueError(f"metadata value of {key!r} is not printable ASCII")
    return encoded


def decode_metadata_value(key: str, value: bytes) -> str | bytes:
    if key.endswith("-bin"):
        return base64.b64decode(value + b"=" * (-len(value) % 4))
    return value.decode("latin-1")


def metadata_block(metadata) -> bytes:
    """Header fields for (key, value) pairs given by a handler; keys are lowercased as gRPC requires."""
    out = []
    for key, value in metadata or ():
        key = key.lower()
        if key.startswith(":") or key.startswith("grpc-") and key not in ("grpc-status-details-bin",):
            raise ValueError(f"metadata key {key!r} is reserved")
        out.append(literal(key.encode("ascii"), metadata_value(key, value)))
    return b"".join(out)
