"""services.common.h2grpc.wire: frames, the header encoding we send, and gRPC's header values."""

from __future__ import annotations

import urllib.parse

import hpack
import pytest

from services.common.h2grpc import wire
from services.common.h2grpc.connection import FloodGuard, HeaderBlockDecoder


def test_frame_head_carries_a_24_bit_length_type_flags_and_stream():
    payload = bytes(70_000)
    frame = wire.frame(wire.DATA, wire.END_STREAM, 0x7FFFFFFF, payload)
    assert int.from_bytes(frame[:3], "big") == 70_000
    assert frame[3] == wire.DATA and frame[4] == wire.END_STREAM
    assert int.from_bytes(frame[5:9], "big") == 0x7FFFFFFF
    assert frame[9:] == payload


@pytest.mark.parametrize(
    "headers",
    [
        [(b"grpc-status", b"0")],
        [(b"content-type", b"application/grpc"), (b"x-long", b"v" * 300)],
        [(b"a" * 200, b"")],
    ],
)
def test_literals_decode_with_a_standard_hpack_decoder(headers):
    block = b"".join(wire.literal(name, value) for name, value in headers)
    assert hpack.Decoder().decode(block, raw=True) == headers


def test_response_head_is_status_200_and_grpc_content_type():
    decoded = hpack.Decoder().decode(wire.RESPONSE_HEAD + wire.TRAILER_OK, raw=True)
    assert decoded == [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"0")]
    assert hpack.Decoder().decode(wire.status_only(415), raw=True) == [(b":status", b"415")]


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(b"1H", 3600.0), (b"2M", 120.0), (b"3S", 3.0), (b"250m", 0.25), (b"99999999u", 99.999999), (b"5n", 5e-9)],
)
def test_grpc_timeout_units(value, seconds):
    assert wire.parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"10", b"123456789S", b"1.5S", b"-1S", b"10x"])
def test_malformed_grpc_timeout_is_refused(value):
    with pytest.raises(ValueError, match="grpc-timeout"):
        wire.parse_timeout(value)


@pytest.mark.parametrize("message", ["plain ascii", "50% done", "ünïcode ✓", "line\nbreak", ""])
def test_grpc_message_percent_encoding_round_trips(message):
    encoded = wire.encode_grpc_message(message)
    assert all(0x20 <= byte <= 0x7E for byte in encoded)
    assert urllib.parse.unquote(encoded.decode("ascii")) == message


def test_binary_metadata_is_base64_and_text_must_be_printable():
    assert wire.metadata_value("x-bin", b"\x00\x01\xff") == b"AAH/"
    assert wire.decode_metadata_value("x-bin", b"AAH/") == b"\x00\x01\xff"
    assert wire.decode_metadata_value("x-bin", b"AAH") == b"\x00\x01"  # unpadded, as gRPC sends it
    assert wire.metadata_value("x-key", "value") == b"value"
    with pytest.raises(ValueError, match="printable ASCII"):
        wire.metadata_value("x-key", "tab\there")


def test_handlers_cannot_set_reserved_metadata():
    assert hpack.Decoder().decode(wire.metadata_block([("X-Key", "v")]), raw=True) == [(b"x-key", b"v")]
    for key in (":path", "grpc-status"):
        with pytest.raises(ValueError, match="reserved"):
            wire.metadata_block([(key, "v")])


def test_settings_and_padding_are_validated():
    assert wire.parse_settings(b"\x00\x04\x00\x01\x00\x00") == [(wire.SETTINGS_INITIAL_WINDOW_SIZE, 65536)]
    with pytest.raises(wire.ConnectionError_):
        wire.parse_settings(b"\x00\x04\x00")
    assert wire.unpad(wire.PADDED, b"\x02abc\x00\x00") == b"abc"
    with pytest.raises(wire.ConnectionError_):
        wire.unpad(wire.PADDED, b"\x09abc")


# -- HPACK decoding with kept results (services.common.h2grpc.connection.HeaderBlockDecoder) -------------


def test_a_repeated_header_block_is_decoded_once_while_the_table_stays():
    encoder, decoder = hpack.Encoder(), HeaderBlockDecoder()
    first = encoder.encode([(":path", "/svc/M"), ("x-key", "v")])  # literals that enter the table
    repeat = encoder.encode([(":path", "/svc/M"), ("x-key", "v")])  # the same fields, now indexed
    assert repeat != first
    calls = []
    inner = decoder._decoder.decode
    decoder._decoder.decode = lambda block, raw: calls.append(block) or inner(block, raw=raw)
    expected = [(b":path", b"/svc/M"), (b"x-key", b"v")]
    assert list(decoder.decode(first)) == expected
    for _ in range(3):
        assert list(decoder.decode(repeat)) == expected
    assert calls == [first, repeat]  # the first decode of `repeat` changed nothing in the table: kept


def test_a_kept_result_is_not_used_once_the_table_has_changed():
    encoder, decoder = hpack.Encoder(), HeaderBlockDecoder()
    encoder.header_table_size = 100  # room for two 36-byte entries: the third evicts the first
    assert list(decoder.decode(encoder.encode([("x-a", "1")]))) == [(b"x-a", b"1")]
    indexed_a = encoder.encode([("x-a", "1")])
    assert list(decoder.decode(indexed_a)) == [(b"x-a", b"1")]
    assert list(decoder.decode(indexed_a)) == [(b"x-a", b"1")]
    decoder.decode(encoder.encode([("x-b", "2"), ("x-c", "3")]))  # evicts x-a; index 62 is x-c now
    indexed_c = encoder.encode([("x-c", "3")])
    assert indexed_c == indexed_a  # the very same bytes...
    assert list(decoder.decode(indexed_c)) == [(b"x-c", b"3")]  # ...mean another field now


def test_a_table_size_update_makes_kept_results_stale():
    encoder, decoder = hpack.Encoder(), HeaderBlockDecoder()
    decoder.decode(encoder.encode([("x-a", "1"), ("x-b", "2")]))
    indexed = encoder.encode([("x-a", "1")])
    assert list(decoder.decode(indexed)) == [(b"x-a", b"1")]
    encoder.header_table_size = 0  # a size update that empties the table
    emptied = encoder.encode([("x-z", "9")])
    assert list(decoder.decode(emptied)) == [(b"x-z", b"9")]
    with pytest.raises(hpack.HPACKError):
        decoder.decode(indexed)  # index 63 no longer exists: decoded again, not answered from the past


def test_flood_guard_allows_bursts_then_the_rate():
    now = [0.0]
    guard = FloodGuard(rate=10, burst=2, clock=lambda: now[0])
    assert [guard.allow() for _ in range(3)] == [True, True, False]
    now[0] += 0.1  # one event's worth of time
    assert [guard.allow(), guard.allow()] == [True, False]
    now[0] += 60  # a long quiet spell refills only up to the burst
    assert [guard.allow() for _ in range(3)] == [True, True, False]
