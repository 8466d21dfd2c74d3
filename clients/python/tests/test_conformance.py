"""Runs every scenario of tests/conformance/ (the format is in its README)
against a fresh real server, through the typed API."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message
from harness import CONFORMANCE

import freshd

SCENARIOS = sorted(CONFORMANCE.glob("*.json"))


def test_the_suite_is_there() -> None:
    assert SCENARIOS, f"no scenario in {CONFORMANCE}"


@pytest.mark.parametrize("path", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario(path: Path, start_server: Callable[..., Any]) -> None:
    scenario = json.loads(path.read_text())
    server = start_server(scenario.get("server", {}))
    with freshd.Client(server.addr, timeout=5.0) as client:
        runner = Runner(client)
        try:
            runner.run(scenario["steps"])
        finally:
            runner.close()


# ------------------------------------------------------------ conversion

_INT64_TYPES = {
    FieldDescriptor.CPPTYPE_INT64,
    FieldDescriptor.CPPTYPE_UINT64,
    FieldDescriptor.CPPTYPE_INT32,
    FieldDescriptor.CPPTYPE_UINT32,
}


def _enum_prefix(enum: EnumDescriptor) -> str:
    # Freshness -> FRESHNESS_, ResetReason -> RESET_REASON_.
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def _convert_value(value: Any, field: FieldDescriptor) -> Any:
    if field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE:
        return _convert_message(value, field.message_type)
    if field.cpp_type == FieldDescriptor.CPPTYPE_ENUM:
        if isinstance(value, str):
            prefix = _enum_prefix(field.enum_type)
            return value[len(prefix) :] if value.startswith(prefix) else value
        known = field.enum_type.values_by_number.get(value)
        return _convert_value(known.name, field) if known is not None else value
    if field.cpp_type in _INT64_TYPES:
        return int(value)  # 64-bit integers come as strings
    return value


def _convert_message(value: Dict[str, Any], descriptor: Descriptor) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, item in value.items():
        field = descriptor.fields_by_name[name]
        if isinstance(item, list):
            out[name] = [_convert_value(x, field) for x in item]
        else:
            out[name] = _convert_value(item, field)
    return out


def to_dict(message: Message) -> Dict[str, Any]:
    """A response as the scenarios see it: proto field names, every field
    with its default, enums without their prefix, integers as ints."""
    try:
        raw = json_format.MessageToDict(
            message,
            preserving_proto_field_name=True,
            always_print_fields_with_no_presence=True,
        )
    except TypeError:  # protobuf before 5.26
        raw = json_format.MessageToDict(
            message,
            preserving_proto_field_name=True,
            including_default_value_fields=True,  # type: ignore[call-arg]
        )
    return _convert_message(raw, message.DESCRIPTOR)


# -------------------------------------------------------------- matching


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def match(expected: Any, actual: Any, where: str = "") -> None:
    """``expected`` as a subset of ``actual``: objects by their keys, lists
    element by element with the same length, numbers as numbers."""
    where = where or "response"
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected an object, got {actual!r}"
        for key, value in expected.items():
            assert key in actual, f"{where}: no field {key!r} in {actual!r}"
            match(value, actual[key], f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list), f"{where}: expected a list, got {actual!r}"
        assert len(expected) == len(actual), (
            f"{where}: expected {len(expected)} elements, got {len(actual)}: {actual!r}"
        )
        for i, (e, a) in enumerate(zip(expected, actual)):
            match(e, a, f"{where}[{i}]")
    elif isinstance(expected, bool) or isinstance(actual, bool):
        assert expected is actual, f"{where}: expected {expected!r}, got {actual!r}"
    elif _is_number(expected) or _is_number(actual):
        if isinstance(expected, str) and re.fullmatch(r"-?\d+", expected):
            expected = int(expected)
        assert _is_number(expected) and _is_number(actual) and expected == actual, (
            f"{where}: expected {expected!r}, got {actual!r}"
        )
    else:
        assert expected == actual, f"{where}: expected {expected!r}, got {actual!r}"


def lookup(response: Dict[str, Any], path: str) -> Any:
    """A response field by name (dots and list indexes for nested ones)."""
    value: Any = response
    for part in path.split("."):
        value = value[int(part)] if isinstance(value, list) else value[part]
    return value


# ----------------------------------------------------------------- runner


class Runner:
    def __init__(self, client: freshd.Client) -> None:
        self.client = client
        self.vars: Dict[str, Any] = {}
        self.streams: Dict[str, freshd.WatchStream] = {}

    def close(self) -> None:
        for stream in self.streams.values():
            stream.cancel()

    def run(self, steps: List[Dict[str, Any]]) -> None:
        for i, step in enumerate(steps):
            try:
                self.step(dict(step))
            except AssertionError as e:
                raise AssertionError(
                    f"step {i} ({step.get('op')}): {e}\n  step: {json.dumps(step)}"
                ) from None

    def substitute(self, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("$"):
            name = value[1:]
            assert name in self.vars, f"variable {value} is not set (have {sorted(self.vars)})"
            return self.vars[name]
        if isinstance(value, dict):
            return {k: self.substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.substitute(v) for v in value]
        return value

    def step(self, step: Dict[str, Any]) -> None:
        op = step.pop("op")
        expect = step.pop("expect", None)
        expect_error: Optional[str] = step.pop("expect_error", None)
        error_contains: Optional[str] = step.pop("expect_error_contains", None)
        save: Optional[Dict[str, str]] = step.pop("save", None)
        handler = getattr(self, "op_" + op, None)
        assert handler is not None, f"unknown op {op!r}"
        args = self.substitute(step)
        try:
            response = handler(args)
        except freshd.FreshdError as e:
            assert expect_error is not None, f"failed with {e.code_name}: {e.details}"
            assert e.code_name == expect_error, (
                f"expected {expect_error}, got {e.code_name}: {e.details}"
            )
            if error_contains is not None:
                assert error_contains in e.details, (
                    f"expected the message to contain {error_contains!r}: {e.details!r}"
                )
            return
        assert expect_error is None, f"expected {expect_error}, got success: {response!r}"
        if isinstance(response, dict) and isinstance(response.get("epoch"), int):
            if response["epoch"]:
                self.vars["epoch"] = response["epoch"]
        if expect is not None:
            match(self.substitute(expect), response)
        for name, field in (save or {}).items():
            assert isinstance(response, dict), f"nothing to save from {op}"
            value = lookup(response, field)
            self.vars[name] = value

    # --- unary operations: the step's fields are the methods' arguments

    def op_publish(self, a: Dict[str, Any]) -> Dict[str, Any]:
        changes = [freshd.Change(**c) for c in a.pop("changes")]
        return to_dict(self.client.publish(changes, **a).raw)

    def op_fill(self, a: Dict[str, Any]) -> Dict[str, Any]:
        return to_dict(self.client.fill(**a).raw)

    def op_check(self, a: Dict[str, Any]) -> Dict[str, Any]:
        return to_dict(self.client.check(**a).raw)

    def op_check_batch(self, a: Dict[str, Any]) -> Dict[str, Any]:
        items = [freshd.CheckItem(**i) for i in a.pop("items")]
        return to_dict(self.client.check_batch(items, **a).raw)

    def op_inspect(self, a: Dict[str, Any]) -> Dict[str, Any]:
        return to_dict(self.client.inspect(**a).raw)

    def op_stats(self, a: Dict[str, Any]) -> Dict[str, Any]:
        assert not a, f"stats takes no fields: {a}"
        return to_dict(self.client.stats().raw)

    def op_lease(self, a: Dict[str, Any]) -> Dict[str, Any]:
        return to_dict(self.client.lease(**a).raw)

    def op_purge(self, a: Dict[str, Any]) -> Dict[str, Any]:
        return to_dict(self.client.purge(**a).raw)

    def op_set_policy(self, a: Dict[str, Any]) -> Dict[str, Any]:
        policy = freshd.Policy(**a.pop("policy"))
        return to_dict(self.client.set_policy(a.pop("namespace"), policy, **a).raw)

    def op_get_policy(self, a: Dict[str, Any]) -> Dict[str, Any]:
        return to_dict(self.client.get_policy(**a).raw)

    def op_sleep(self, a: Dict[str, Any]) -> None:
        time.sleep(a["ms"] / 1000)

    # --- Watch streams

    def op_watch_open(self, a: Dict[str, Any]) -> Dict[str, Any]:
        name = a.pop("stream")
        assert name not in self.streams, f"stream {name!r} is already open"
        resume = a.pop("resume", None)
        if resume is not None:
            a["resume"] = freshd.ResumeToken(**resume)
        stream = self.client.watch(**a)
        self.streams[name] = stream
        return to_dict(stream.started.raw)

    def _stream(self, a: Dict[str, Any]) -> freshd.WatchStream:
        name = a.pop("stream")
        assert name in self.streams, f"no open stream {name!r}"
        return self.streams[name]

    def op_watch_send(self, a: Dict[str, Any]) -> None:
        stream = self._stream(a)
        assert len(a) == 1, f"watch_send takes one request: {a}"
        ((kind, value),) = a.items()
        if kind == "ack":
            stream.ack(value)
        else:
            assert kind in ("track", "untrack", "subscribe", "unsubscribe"), kind
            getattr(stream, kind)(value)

    def op_watch_sync(self, a: Dict[str, Any]) -> Dict[str, Any]:
        stream = self._stream(a)
        synced = stream.sync(timeout=10.0)
        return {
            "notices": [to_dict(n.raw) for n in synced.notices],
            "resets": [to_dict(r.raw) for r in synced.resets],
            "refused": [
                {"request": r.request, "code": r.code.name, "message": r.message}
                for r in synced.refused
            ],
            "progress": synced.progress.seq,
        }

    def op_watch_close(self, a: Dict[str, Any]) -> None:
        stream = self._stream(a)
        stream.close()
        # The server ends the stream once it reads the close: wait for it, so
        # that the next steps find it gone.
        assert stream.wait_closed(timeout=5.0), "the server did not end the stream"


# --------------------------------------------- the runner checks for real


def test_match_is_a_subset_match_that_fails_on_differences() -> None:
    actual = {
        "freshness": "FRESH",
        "version": 7,
        "results": [{"decision": "FRESH"}],
        "critical": False,
    }
    match({"freshness": "FRESH", "version": 7}, actual)
    match({"results": [{}]}, actual)
    match({"version": "7"}, actual)  # a 64-bit integer written as a string
    for wrong in (
        {"freshness": "STALE"},
        {"version": 8},
        {"results": []},
        {"results": [{"decision": "FRESH"}, {"decision": "FRESH"}]},
        {"critical": 0},
        {"missing": 1},
    ):
        with pytest.raises(AssertionError):
            match(wrong, actual)


def test_responses_convert_enums_and_64_bit_integers(client: freshd.Client) -> None:
    client.fill("feed:1", ["posts:1"], ttl_ms=60000)
    converted = to_dict(client.check("feed:1", 1 << 40).raw)
    assert converted["freshness"] == "STALE"
    assert converted["decision"] == "REFETCH"
    assert isinstance(converted["epoch"], int) and converted["epoch"] > 0
    assert converted["version"] == 1 and converted["critical"] is False


def test_a_wrong_expectation_fails_the_scenario(start_server: Callable[..., Any]) -> None:
    server = start_server()
    steps = [
        {
            "op": "fill",
            "key": "k",
            "dependencies": ["d"],
            "ttl_ms": 60000,
            "observed_seq": 0,
            "save": {"v": "version"},
        },
        {"op": "publish", "changes": [{"key": "d"}]},
        {"op": "check", "key": "k", "version": "$v", "expect": {"freshness": "FRESH"}},
    ]
    with freshd.Client(server.addr) as client:
        wrong = r"step 2 \(check\).*expected 'FRESH', got 'STALE'"
        with pytest.raises(AssertionError, match=wrong):
            Runner(client).run(steps)
        with pytest.raises(AssertionError, match="expected ABORTED, got success"):
            Runner(client).run([{"op": "stats", "expect_error": "ABORTED"}])
        with pytest.raises(AssertionError, match="failed with NOT_FOUND"):
            Runner(client).run([{"op": "inspect", "key": "nothing"}])
        with pytest.raises(AssertionError, match=r"variable \$nope is not set"):
            Runner(client).run([{"op": "check", "key": "k", "version": "$nope"}])
