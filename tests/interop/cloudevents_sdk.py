#!/usr/bin/env python3
"""Interoperability of Loom's CloudEvents envelope with the official Python SDK.

Run by tests/integration/test_envelope_interop.c with the project's venv
(./scripts/setup creates .venv with the pinned `cloudevents` package):

  cloudevents_sdk.py write DIR   writes Kafka messages made by the SDK to
                                 DIR/sdk_vectors.json for Loom to decode
  cloudevents_sdk.py check DIR   reads the Kafka messages Loom made from
                                 DIR/loom_vectors.json and checks that the SDK
                                 reads each one back as the event Loom meant

Both Kafka APIs of the SDK are used: the current one
(cloudevents.core.bindings.kafka) and the 1.x one, kept in 2.x as
cloudevents.v1.kafka (`cloudevents.kafka` in 1.x releases).

A vector is a Kafka message as JSON, bytes in hex:
  {"name": ..., "api": "core"|"v1", "mode": "binary"|"structured",
   "headers": [[name, hex], ...], "key": hex or null, "value": hex,
   "expect": {"attributes": {name: text}, "data_json": value | "data_hex": hex}}
("expect" only in Loom's vectors; Loom's test knows what the SDK's hold.)

`check` prints every mismatch and exits 1 when there is one, 2 on bad usage.
"""

import json
import os
import sys
from datetime import datetime, timezone

from dateutil.parser import isoparse

import cloudevents
from cloudevents.core.bindings import kafka as core_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as CoreEvent
from cloudevents.v1 import kafka as v1_kafka
from cloudevents.v1.http import CloudEvent as V1Event

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# The event every "full" SDK vector carries; test_envelope_interop.c asserts
# the same values.
FULL = {
    "specversion": "1.0",
    "id": "sdk-1",
    "source": "https://example.com/app",
    "type": "messages.put_batch",
    "subject": "channel/7",
    "datacontenttype": "application/json",
    "dataschema": "https://example.com/s.json",
    "rayid": "0191b2c4-0000-7000-8000-000000000001",
    "causationid": "0191b2c4-0000-7000-8000-000000000002",
    "deadline": "2024-02-29T12:00:30Z",
    "traceparent": TRACEPARENT,
    "tenant": "acme",
    "partitionkey": "stream-42",
}
FULL_TIME = datetime(2024, 2, 29, 12, 0, 0, 123456, tzinfo=timezone.utc)
FULL_DATA = {"text": "hello", "n": [1, 2], "nested": {"ok": True}}
BYTES = bytes([0x00, 0x01, 0x02, 0xFE, 0xFF, 0x7B, 0x80])
TEXT = 'hello "you"'


def _vector(name, api, mode, msg):
    value = msg.value.encode("utf-8") if isinstance(msg.value, str) else msg.value
    key = msg.key.encode("utf-8") if isinstance(msg.key, str) else msg.key
    return {
        "name": name,
        "api": api,
        "mode": mode,
        "headers": [[k, v.hex()] for k, v in msg.headers.items()],
        "key": key.hex() if key is not None else None,
        "value": value.hex(),
    }


def _core(attrs, data, time=None):
    a = dict(attrs)
    if time is not None:
        a["time"] = time
    return CoreEvent(a, data)


def write(directory):
    fmt = JSONFormat()
    vectors = []
    full = _core(FULL, FULL_DATA, FULL_TIME)
    vectors.append(_vector("core_binary_full", "core", "binary", core_kafka.to_binary(full, fmt)))
    vectors.append(
        _vector("core_structured_full", "core", "structured", core_kafka.to_structured(full, fmt))
    )
    octets = {"id": "sdk-2", "source": "/sdk", "type": "blob.put",
              "datacontenttype": "application/octet-stream", "time": FULL_TIME}
    for mode, conv in (("binary", core_kafka.to_binary), ("structured", core_kafka.to_structured)):
        vectors.append(_vector(f"core_{mode}_bytes", "core", mode, conv(_core(octets, BYTES), fmt)))
    text = {"id": "sdk-3", "source": "/sdk", "type": "note.put",
            "datacontenttype": "text/plain; charset=utf-8", "time": FULL_TIME}
    for mode, conv in (("binary", core_kafka.to_binary), ("structured", core_kafka.to_structured)):
        vectors.append(_vector(f"core_{mode}_text", "core", mode, conv(_core(text, TEXT), fmt)))
    # No data, only the required attributes (the SDK adds specversion and time).
    minimal = _core({"id": "sdk-4", "source": "/sdk", "type": "ping"}, None, FULL_TIME)
    vectors.append(_vector("core_binary_minimal", "core", "binary", core_kafka.to_binary(minimal, fmt)))

    # The 1.x API: times are strings, and to_structured moves datacontenttype
    # from the JSON to the content-type header.
    v1_attrs = dict(FULL, id="sdk-v1", time="2024-02-29T12:00:00.123456Z")
    v1_event = V1Event.create(v1_attrs, FULL_DATA)
    vectors.append(_vector("v1_binary_full", "v1", "binary", v1_kafka.to_binary(v1_event)))
    vectors.append(_vector("v1_structured_full", "v1", "structured", v1_kafka.to_structured(v1_event)))

    out = {"cloudevents_version": cloudevents.__version__, "vectors": vectors}
    with open(os.path.join(directory, "sdk_vectors.json"), "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {len(vectors)} vectors made by cloudevents {cloudevents.__version__}")


# ---- check ---------------------------------------------------------------------


def _as_bytes(data):
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):
        return data.encode("utf-8")
    return None


def _compare(vec, api, attrs, data, problems):
    """Compares what the SDK read (attrs: name -> value, data) with vec's expect."""
    want = dict(vec["expect"]["attributes"])
    if vec["key"] is not None:
        want["partitionkey"] = bytes.fromhex(vec["key"]).decode("utf-8")
    where = f"{vec['name']} ({api} from_{vec['mode']})"
    got = {}
    for name, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        got[name] = value
    skip = set()
    if api == "v1" and vec["mode"] == "structured":
        # The 1.x from_structured takes datacontenttype from the content-type
        # header, which structured mode sets to application/cloudevents+json.
        skip.add("datacontenttype")
    for name in sorted(set(want) | set(got)):
        if name in skip:
            continue
        if name not in got:
            problems.append(f"{where}: attribute {name} is missing (expected {want[name]!r})")
        elif name not in want:
            problems.append(f"{where}: unexpected attribute {name}={got[name]!r}")
        elif name == "time":
            g = got[name] if isinstance(got[name], datetime) else isoparse(got[name])
            if g != isoparse(want[name]):
                problems.append(f"{where}: time is {g.isoformat()}, expected {want[name]}")
        elif str(got[name]) != want[name]:
            problems.append(f"{where}: {name} is {got[name]!r}, expected {want[name]!r}")
    exp = vec["expect"]
    if "data_json" in exp:
        d = data
        if isinstance(d, (bytes, str)):
            try:
                d = json.loads(d)
            except ValueError:
                pass
        if d != exp["data_json"]:
            problems.append(f"{where}: data is {data!r}, expected JSON {exp['data_json']!r}")
    elif "data_hex" in exp:
        want_b = bytes.fromhex(exp["data_hex"])
        if _as_bytes(data) != want_b:
            problems.append(f"{where}: data is {data!r}, expected bytes {want_b!r}")
    elif data not in (None, b"", ""):
        problems.append(f"{where}: data is {data!r}, expected none")


def _is_json_type(ct):
    return ct is None or bool(JSONFormat.JSON_CONTENT_TYPE_PATTERN.match(ct))


def check(directory):
    with open(os.path.join(directory, "loom_vectors.json"), encoding="utf-8") as f:
        vectors = json.load(f)["vectors"]
    if not vectors:
        print("no vectors in loom_vectors.json", file=sys.stderr)
        return 1
    fmt = JSONFormat()
    problems = []
    for vec in vectors:
        headers = {k: bytes.fromhex(v) for k, v in vec["headers"]}
        key = bytes.fromhex(vec["key"]) if vec["key"] is not None else None
        value = bytes.fromhex(vec["value"])
        ct = headers.get("content-type", b"").decode("utf-8") or None
        try:
            msg = core_kafka.KafkaMessage(headers=headers, key=key, value=value)
            if vec["mode"] == "binary":
                ev = core_kafka.from_binary(msg, fmt)
            else:
                ev = core_kafka.from_structured(msg, fmt)
            # from_kafka must detect the same mode.
            ev2 = core_kafka.from_kafka(msg, fmt)
            if ev2.get_attributes() != ev.get_attributes():
                problems.append(f"{vec['name']}: core from_kafka read another event")
            _compare(vec, "core", ev.get_attributes(), ev.get_data(), problems)
        except Exception as e:  # noqa: BLE001 - any SDK failure is a finding
            problems.append(f"{vec['name']} (core): the SDK refused it: {type(e).__name__}: {e}")
        try:
            msg = v1_kafka.KafkaMessage(headers, key, value)
            if vec["mode"] == "binary":
                unmarshal = None if _is_json_type(ct) else (lambda b: b)
                ev = v1_kafka.from_binary(msg, data_unmarshaller=unmarshal)
            else:
                ev = v1_kafka.from_structured(msg)
            _compare(vec, "v1", ev.get_attributes(), ev.get_data(), problems)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{vec['name']} (v1): the SDK refused it: {type(e).__name__}: {e}")
    for p in problems:
        print(p, file=sys.stderr)
    if problems:
        print(f"{len(problems)} mismatches in {len(vectors)} vectors "
              f"(cloudevents {cloudevents.__version__})", file=sys.stderr)
        return 1
    print(f"checked {len(vectors)} vectors made by Loom with cloudevents {cloudevents.__version__}")
    return 0


def main(argv):
    if len(argv) != 3 or argv[1] not in ("write", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[1] == "write":
        write(argv[2])
        return 0
    return check(argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
