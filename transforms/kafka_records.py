"""Our Avro records as Kafka messages, and back.

One record is one message (docs/kafka.md, "Wire format"):

* **value**: the record in Avro's binary encoding, schemaless (no container, no magic byte):
  what ``fastavro.schemaless_writer`` writes;
* **key**: the record's ``key_field`` (the request id) as UTF-8, so that a request's feature
  log, actions and example land in the same partition of their topics;
* **header** ``avro.schema.fingerprint``: the 8 bytes of the writer schema's CRC-64-AVRO
  (Rabin) fingerprint of its Parsing Canonical Form, little-endian (as in Avro's
  single-object encoding; Java: ``SchemaNormalization.parsingFingerprint64``).

Decoding never raises on a bad message: it gives the record or a dead-letter reason.
``no_payload`` (no value: a tombstone), ``no_fingerprint`` (no such header, or not 8 bytes),
``wrong_fingerprint`` (another schema: the detail names it if it is one of ``schemas/``),
``invalid_utf8``, ``corrupt_record`` (the payload does not decode: cut short, a bad union
branch, ...), ``trailing_bytes`` (it decodes but bytes are left over) and ``non_canonical``
(it decodes, but writing the record again gives other bytes: a union index out of range,
which fastavro's reader wraps around instead of refusing, an over-long varint, a map written
in several blocks). So a message decodes to a record exactly when encoding that record gives
its payload back (tests/test_kafka.py fuzzes this); ``strict=False`` drops the last check
(about as costly as the decoding).

A dead letter of a message (:func:`kafka_dead_letter`) has the keys of the file readers'
(``transforms.avro_recovery.file_dead_letter``) with the message's place instead of a file:
``{"reason", "detail", "topic", "partition", "offset", "timestamp_ms", "key", "payload",
"record": None, "records_lost": 0}``; ``key`` and ``payload`` are the raw bytes in base64
(JSON-able; ``base64.b64decode`` gives them back), so a dead letter can be replayed.

**Watermark marks** (:func:`watermark_mark`, :func:`split_marks`): a writer that knows its
event time says so in each partition of its topic with a message of no key and no value and
one header, ``beam-monolith.watermark``: 8 bytes, big-endian, of an event time ``T`` in ms
(signed). It means: every later message of that partition has an event time ``>= T`` (the
``_watermark.json`` of a log folder, per partition). A reader advances the partition's
watermark to it, so a partition with no records for a while does not hold back the
event-time timers of what reads it (the join's windows); ``T = END_OF_STREAM`` ends the
partition (its writer is done: nothing after it is read). Marks are not records: readers
never pass them on nor count them as dead letters.
"""
from __future__ import annotations

import base64
import functools
import io
from typing import Any, Iterable, NamedTuple, Optional

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from schemas import SCHEMA_DIR, load_schema
from transforms.sources import BadRecord

__all__ = ["KafkaRecordCodec", "Decoded", "kafka_dead_letter", "schema_fingerprint",
           "FINGERPRINT_HEADER", "WATERMARK_HEADER", "END_OF_STREAM", "watermark_mark",
           "mark_of", "split_marks"]

FINGERPRINT_HEADER = "avro.schema.fingerprint"
WATERMARK_HEADER = "beam-monolith.watermark"
#: The event time (ms) of the mark that ends a partition: its writer writes no more.
END_OF_STREAM = (1 << 63) - 1
_MAX_DETAIL = 300


def schema_fingerprint(schema) -> bytes:
    """The CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form.

    Args:
        schema: a schema (parsed by fastavro or not).

    Returns:
        Its 8 bytes, little-endian (Avro's single-object encoding order).

    The Avro specification's test vector (``"null"``: 7195948357588979594):

    >>> int.from_bytes(schema_fingerprint("null"), "little", signed=True)
    7195948357588979594
    >>> schema_fingerprint(load_schema("action_log")).hex()
    '58e36ca7ca5f7a20'
    """
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@functools.lru_cache(maxsize=None)
def _known_fingerprints() -> dict:
    """{fingerprint: schema name} of every schema of ``schemas/``."""
    return {schema_fingerprint(load_schema(p.stem)): p.stem
            for p in sorted(SCHEMA_DIR.glob("*.avsc"))}


class Decoded(NamedTuple):
    """What decoding one message gave: ``record`` (a dict), or None and ``reason`` (a
    dead-letter reason, module docstring) with ``detail`` (for a person)."""
    record: Optional[dict]
    reason: Optional[str] = None
    detail: str = ""


class KafkaRecordCodec:
    """Records of one Avro schema ↔ Kafka messages (module docstring).

    Args:
        schema: the name of one of ``schemas/`` (``"feature_log"``, ``"action_log"``,
            ``"example"``) or a schema (dict).
        key_field: the record field that is the message key (None: no key).
        strict: refuse a payload that decodes but that the record does not encode back to
            (``non_canonical``).

    >>> codec = KafkaRecordCodec("action_log")
    >>> key, value = codec.encode({"request_id": "r1", "ts_ms": 5, "action": "click"})
    >>> key, value.hex(), codec.headers
    (b'r1', '0472310a0a636c69636b', [('avro.schema.fingerprint', b'X\\xe3l\\xa7\\xca_z ')])
    >>> codec.decode(value, codec.headers)
    Decoded(record={'request_id': 'r1', 'ts_ms': 5, 'action': 'click'}, reason=None, detail='')
    >>> codec.decode(value[:-1], codec.headers).reason
    'corrupt_record'
    >>> codec.decode(value, []).reason
    'no_fingerprint'
    >>> KafkaRecordCodec("example").decode(value, codec.headers).detail
    'the payload was written with schema action_log (58e36ca7ca5f7a20), not example (6b3908288459aadb)'
    """

    def __init__(self, schema: str | dict, key_field: Optional[str] = "request_id",
                 strict: bool = True):
        self.name = schema if isinstance(schema, str) else schema.get("name", "record")
        self.schema = load_schema(schema) if isinstance(schema, str) else fastavro.parse_schema(
            schema)
        self.key_field = key_field
        self.strict = strict
        self.fingerprint = schema_fingerprint(self.schema)
        self.headers = [(FINGERPRINT_HEADER, self.fingerprint)]

    # ------------------------------------------------------------------ encoding

    def encode(self, record: dict) -> tuple[Optional[bytes], bytes]:
        """One record → ``(key, value)``; the headers are :attr:`headers`.

        Args:
            record: a dict of the schema.

        Returns:
            The key (UTF-8 of ``record[key_field]``; None without a key field, or if the
            field is None) and the value (schemaless Avro binary).

        Raises:
            BadRecord: the record does not fit the schema (``not_encodable``) or its key
                is not a string (``wrong_type:KEY_FIELD``).
        """
        out = io.BytesIO()
        try:
            fastavro.schemaless_writer(out, self.schema, record)
        except Exception as e:  # fastavro raises ValueError, TypeError, KeyError, ...
            raise BadRecord("not_encodable", f"{type(e).__name__}: {e}"[:_MAX_DETAIL]) from None
        return self._key(record), out.getvalue()

    def encode_records(self, records: Iterable[dict]) -> list[tuple[Optional[bytes], bytes]]:
        """Many records → ``[(key, value)]`` (as :meth:`encode`, one writer for all).

        Raises:
            BadRecord: a record does not fit (which one is in the detail).
        """
        out, pairs, start = io.BytesIO(), [], 0
        write, schema = fastavro.schemaless_writer, self.schema
        for i, record in enumerate(records):
            try:
                write(out, schema, record)
            except Exception as e:
                raise BadRecord("not_encodable", f"record {i}: {type(e).__name__}: {e}"[
                    :_MAX_DETAIL]) from None
            end = out.tell()
            pairs.append((self._key(record), out.getbuffer()[start:end].tobytes()))
            start = end
        return pairs

    def _key(self, record: dict) -> Optional[bytes]:
        if self.key_field is None:
            return None
        key = record.get(self.key_field)
        if key is None or isinstance(key, bytes):
            return key
        if not isinstance(key, str):
            raise BadRecord(f"wrong_type:{self.key_field}", f"a message key must be a string, "
                            f"got {type(key).__name__} {key!r:.100}")
        return key.encode("utf-8")

    # ------------------------------------------------------------------ decoding

    def decode(self, value: Optional[bytes], headers) -> Decoded:
        """One message's value and headers → :class:`Decoded`; never raises.

        Args:
            value: the message value (None: a tombstone).
            headers: its headers, ``[(name, bytes)]`` or None (the last one named
                ``avro.schema.fingerprint`` counts).

        Returns:
            The record, or the reason it is a dead letter (module docstring).
        """
        fp = None
        for name, header in headers or ():
            if name == FINGERPRINT_HEADER:
                fp = header
        if fp != self.fingerprint:
            return self._fingerprint_problem(fp)
        if value is None:
            return Decoded(None, "no_payload", "the message has no value (a tombstone)")
        return self._decode_value(value)

    def decode_messages(self, messages) -> tuple[list, list]:
        """Consumed messages → ``(decoded, dead letters)``; never raises on a bad message.

        Args:
            messages: ``confluent_kafka.Message`` objects (or any with its ``value()``,
                ``headers()``, ``key()``, ``topic()``, ``partition()``, ``offset()``,
                ``timestamp()``; messages whose ``error()`` is set are skipped: they are
                the consumer's events, not records).

        Returns:
            ``[(message, record)]`` in the messages' order, and the dead letters
            (:func:`kafka_dead_letter`) of the others.
        """
        good, dead = [], []
        fp_ok, decode_value = self.fingerprint, self._decode_value
        for message in messages:
            if message.error() is not None:
                continue
            headers = message.headers()
            fp = None
            for name, header in headers or ():
                if name == FINGERPRINT_HEADER:
                    fp = header
            value = message.value()
            if fp != fp_ok:
                decoded = self._fingerprint_problem(fp)
            elif value is None:
                decoded = Decoded(None, "no_payload", "the message has no value (a tombstone)")
            else:
                decoded = decode_value(value)
            if decoded.reason is None:
                good.append((message, decoded.record))
            else:
                dead.append(kafka_dead_letter(message, decoded.reason, decoded.detail))
        return good, dead

    def _decode_value(self, value: bytes) -> Decoded:
        data = io.BytesIO(value)
        try:
            record = fastavro.schemaless_reader(data, self.schema, None)
        except UnicodeDecodeError as e:
            return Decoded(None, "invalid_utf8", f"a string is not UTF-8: {e}"[:_MAX_DETAIL])
        except Exception as e:  # EOFError, IndexError, ValueError, ...: not our schema's
            return Decoded(None, "corrupt_record",
                           f"the payload ({len(value)} bytes) does not decode as "
                           f"{self.name}: {type(e).__name__}: {e}"[:_MAX_DETAIL])
        if data.tell() != len(value):
            return Decoded(None, "trailing_bytes",
                           f"{len(value) - data.tell()} of the payload's {len(value)} bytes "
                           f"are left after a {self.name} record")
        if self.strict:
            again = io.BytesIO()
            try:
                fastavro.schemaless_writer(again, self.schema, record)
                canonical = again.getvalue() == value
            except Exception:
                canonical = False
            if not canonical:
                return Decoded(None, "non_canonical",
                               f"the payload decodes as {self.name}, but the record does not "
                               "encode back to it (a union branch out of range, an over-long "
                               "varint, a map or array in several blocks, ...)")
        return Decoded(record)

    def _fingerprint_problem(self, fp) -> Decoded:
        if fp is None:
            return Decoded(None, "no_fingerprint",
                           f"the message has no {FINGERPRINT_HEADER} header")
        if not isinstance(fp, bytes) or len(fp) != 8:
            return Decoded(None, "no_fingerprint",
                           f"the {FINGERPRINT_HEADER} header is not 8 bytes: {fp!r:.60}")
        known = _known_fingerprints().get(fp)
        return Decoded(None, "wrong_fingerprint",
                       f"the payload was written with schema "
                       f"{known + ' (' + fp.hex() + ')' if known else 'of fingerprint ' + fp.hex()}"
                       f", not {self.name} ({self.fingerprint.hex()})")


def watermark_mark(ts_ms: int) -> list:
    """The headers of a watermark mark (module docstring): produce them with no key and no
    value to every partition of the topic.

    Args:
        ts_ms: the event time (ms) that every later message of the partition is at or after;
            :data:`END_OF_STREAM` to end the partition.

    Returns:
        ``[("beam-monolith.watermark", 8 bytes)]``.

    >>> watermark_mark(1704067200000)
    [('beam-monolith.watermark', b'\\x00\\x00\\x01\\x8c\\xc2Q\\xf4\\x00')]
    >>> mark_of(_Message(None, watermark_mark(END_OF_STREAM))) == END_OF_STREAM
    True
    """
    return [(WATERMARK_HEADER, int(ts_ms).to_bytes(8, "big", signed=True))]


def mark_of(message) -> Optional[int]:
    """The event time of a watermark mark, or None if the message is not one (it has a value,
    or no well-formed ``beam-monolith.watermark`` header: a record, or a dead letter).

    Args:
        message: a ``confluent_kafka.Message`` (or alike: ``value()``, ``headers()``).
    """
    if message.value() is not None:
        return None
    for name, header in message.headers() or ():
        if name == WATERMARK_HEADER and isinstance(header, bytes) and len(header) == 8:
            return int.from_bytes(header, "big", signed=True)
    return None


def split_marks(messages) -> tuple[list, Optional[int], Optional[int]]:
    """Consumed messages → the ones that are not marks, the latest mark's event time, and
    the offset of an :data:`END_OF_STREAM` mark.

    Args:
        messages: messages of one partition, in offset order (consumer events, whose
            ``error()`` is set, are passed on as they are).

    Returns:
        ``(messages before the end, in order; the highest mark before the end or None; the
        end mark's offset or None)``. Messages after an end mark are left out.

    >>> msgs = [_Message(b"r1"), _Message(None, watermark_mark(7)), _Message(b"r2"),
    ...         _Message(None, watermark_mark(END_OF_STREAM), offset=3), _Message(b"r3")]
    >>> rest, mark, end = split_marks(msgs)
    >>> [m.value() for m in rest], mark, end
    ([b'r1', b'r2'], 7, 3)
    """
    rest, latest = [], None
    for message in messages:
        mark = mark_of(message) if message.error() is None else None
        if mark is None:
            rest.append(message)
        elif mark == END_OF_STREAM:
            return rest, latest, message.offset()
        elif latest is None or mark > latest:
            latest = mark
    return rest, latest, None


class _Message:
    """A stand-in for a consumed message in this module's examples."""

    def __init__(self, value, headers=None, offset=0):
        self._value, self._headers, self._offset = value, headers, offset

    def value(self):
        return self._value

    def headers(self):
        return self._headers

    def offset(self):
        return self._offset

    def error(self):
        return None


def kafka_dead_letter(message: Any, reason: str, detail: str) -> dict:
    """The dead letter of a message that cannot be passed on.

    Args:
        message: a ``confluent_kafka.Message`` (or alike: ``decode_messages``).
        reason: a short machine-readable code (module docstring).
        detail: what is wrong, for a person.

    Returns:
        ``{"reason", "detail", "topic", "partition", "offset", "timestamp_ms", "key",
        "payload", "record": None, "records_lost": 0}`` (key and payload in base64).
    """
    timestamp_type, timestamp_ms = message.timestamp()
    return {"reason": reason, "detail": detail, "topic": message.topic(),
            "partition": message.partition(), "offset": message.offset(),
            "timestamp_ms": timestamp_ms if timestamp_type else None,
            "key": _b64(message.key()), "payload": _b64(message.value()),
            "record": None, "records_lost": 0}


def _b64(data: Optional[bytes]) -> Optional[str]:
    return None if data is None else base64.b64encode(data).decode("ascii")
