"""Attacks on the usage log: edits, removal, reordering, insertion, truncation, another device's key.
Each is reported at the index of the first bad record, with the valid prefix kept."""

from __future__ import annotations

import json

import pytest
from drm_testkit import BUILD_HASH, NOW, PROPERTY
from hypothesis import given
from hypothesis import strategies as st

import drm
from drm._canonical import dumps


def _log(device: drm.DeviceKeys, n: int, events: list[str] | None = None) -> list[bytes]:
    lines: list[bytes] = []
    prev = None
    for i in range(n):
        line = drm.make_record(
            device.sign,
            prev_line=prev,
            seq=i,
            device_id=device.device_id,
            t=NOW + i,
            event=(events[i] if events else "run"),
            license_id="lic_1",
            build_hash=BUILD_HASH,
            runs=i + 1,
        )
        lines.append(line)
        prev = line
    return lines


def _check(device: drm.DeviceKeys, lines: list[bytes], **kw: object) -> drm.LogReport:
    data = b"".join(line + b"\n" for line in lines)
    return drm.verify_log(data, device.sign.public_key(), device_id=device.device_id, **kw)  # type: ignore[arg-type]


@PROPERTY
@given(events=st.lists(st.sampled_from(["run", "refused", "sync"]), max_size=20))
def test_round_trip(device: drm.DeviceKeys, events: list[str]) -> None:
    lines = _log(device, len(events), events)
    report = _check(device, lines)
    assert report.ok and report.first_bad is None
    assert [r["event"] for r in report.records] == events
    assert [r["seq"] for r in report.records] == list(range(len(events)))


@PROPERTY
@given(n=st.integers(min_value=2, max_value=12), data=st.data())
def test_any_edit_removal_reorder_or_insertion_reports_the_first_bad_index(
    device: drm.DeviceKeys, n: int, data: st.DataObject
) -> None:
    lines = _log(device, n)
    i = data.draw(st.integers(min_value=0, max_value=n - 1), label="index")
    attack = data.draw(st.sampled_from(["edit", "remove", "swap", "insert", "duplicate"]), label="attack")
    tampered = list(lines)
    if attack == "edit":
        obj = json.loads(lines[i])
        obj["rec"]["runs"] = 0  # roll the counter back
        tampered[i] = dumps(obj)
        bad = i
    elif attack == "remove":
        del tampered[i]
        bad = i if i < n - 1 else None  # removing the tail is truncation: see min_records
    elif attack == "swap":
        j = (i + 1) % n
        tampered[i], tampered[j] = tampered[j], tampered[i]
        bad = min(i, j)
    elif attack == "insert":
        forged = drm.make_record(
            drm.DeviceKeys.generate().sign,
            prev_line=lines[i - 1] if i else None,
            seq=i,
            device_id=device.device_id,
            t=NOW,
            event="sync",
            license_id="lic_1",
            build_hash=BUILD_HASH,
            runs=0,
        )
        tampered.insert(i, forged)
        bad = i
    else:
        tampered.insert(i + 1, lines[i])
        bad = i + 1
    report = _check(device, tampered)
    if bad is None:
        assert report.ok and not _check(device, tampered, min_records=n).ok
    else:
        assert not report.ok
        assert report.first_bad == bad
        assert len(report.records) == bad
        assert list(report.records) == [json.loads(x)["rec"] for x in lines[:bad]]


def test_truncation_inside_a_line_and_of_whole_records(device: drm.DeviceKeys) -> None:
    lines = _log(device, 5)
    data = b"".join(line + b"\n" for line in lines)
    last_start = len(data) - len(lines[-1]) - 1
    for cut in range(last_start + 1, len(data) - 1):
        report = drm.verify_log(data[:cut], device.sign.public_key(), device_id=device.device_id)
        assert (report.ok, report.first_bad) == (False, 4)
    report = _check(device, lines[:3], min_records=5)
    assert (report.ok, report.first_bad, len(report.records)) == (False, 3, 3)
    assert "truncated" in report.reason


def test_another_devices_key_or_id_fails_at_record_zero(
    device: drm.DeviceKeys, other_device: drm.DeviceKeys
) -> None:
    lines = _log(device, 3)
    data = b"\n".join(lines)
    report = drm.verify_log(data, other_device.sign.public_key(), device_id=device.device_id)
    assert (report.ok, report.first_bad, report.reason) == (False, 0, "signature invalid")
    report = drm.verify_log(data, device.sign.public_key(), device_id=other_device.device_id)
    assert (report.ok, report.first_bad) == (False, 0)


def test_continuation_from_a_known_head(device: drm.DeviceKeys) -> None:
    lines = _log(device, 6)
    head = drm.sha256_tag(lines[2])
    tail = b"\n".join(lines[3:])
    assert drm.verify_log(
        tail, device.sign.public_key(), device_id=device.device_id, start_seq=3, start_prev=head
    ).ok
    report = drm.verify_log(
        tail,
        device.sign.public_key(),
        device_id=device.device_id,
        start_seq=3,
        start_prev=drm.sha256_tag(lines[1]),
    )
    assert report.first_bad == 0


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"{}",
        b"not json",
        b'{"rec":{},"sig":""}',
        b"[" * 5000,
        b'{"rec":1,"rec":2}',
        b'{"rec": {}, "sig": ""}',
        b'{"rec":{"seq":' + b"9" * 5000 + b"}}",
        b"\xff\xfe",
        b'{"sig":"' + b"A" * 10000 + b'"}',
    ],
)
def test_malformed_lines_are_reported_not_raised(device: drm.DeviceKeys, line: bytes) -> None:
    lines = _log(device, 2)
    report = drm.verify_log(
        lines[0] + b"\n" + line + b"\n" + lines[1], device.sign.public_key(), device_id=device.device_id
    )
    assert (report.ok, report.first_bad) == (False, 1)


def test_record_bounds(device: drm.DeviceKeys) -> None:
    with pytest.raises(drm.FormatError):
        drm.make_record(
            device.sign,
            prev_line=None,
            seq=-1,
            device_id="d",
            t=0,
            event="run",
            license_id="l",
            build_hash=BUILD_HASH,
            runs=0,
        )
    with pytest.raises(drm.FormatError):
        drm.make_record(
            device.sign,
            prev_line=None,
            seq=0,
            device_id="d",
            t=0,
            event="steal",
            license_id="l",
            build_hash=BUILD_HASH,
            runs=0,
        )
    with pytest.raises(drm.FormatError):
        drm.verify_log("text", device.sign.public_key(), device_id="d")  # type: ignore[arg-type]
    with pytest.raises(drm.FormatError):
        drm.verify_log(b"x" * 100, device.sign.public_key(), device_id="d", max_bytes=10)
