"""The typed API against a real server: results, errors and the Watch stream."""

from __future__ import annotations

import grpc
import pytest
from harness import wait_until

import freshd
from freshd import Change, CheckItem, Decision, Freshness, Policy, ResumeOutcome


def test_publish_fill_check_round_trip(client: freshd.Client) -> None:
    first = client.check("feed:user:1")
    assert first.freshness is Freshness.UNKNOWN and first.decision is Decision.UNKNOWN
    fill = client.fill(
        "feed:user:1",
        ["follows:1", "posts:author:7"],
        ttl_ms=60000,
        observed_seq=first.seq,
        epoch=first.epoch,
    )
    assert fill.ttl_ms == 60000 and fill.epoch == first.epoch and fill.version > 0

    fresh = client.check("feed:user:1", fill.version, age_ms=10, epoch=fill.epoch)
    assert fresh.freshness is Freshness.FRESH and fresh.decision is Decision.FRESH
    assert fresh.check_sample_rate == 1.0

    published = client.publish([Change("posts:author:7", event_time_unix_ms=1)])
    assert published.results[0].invalidated == 2
    assert not published.results[0].duplicate

    stale = client.check("feed:user:1", fill.version)
    assert stale.freshness is Freshness.STALE and stale.version == published.seq

    info = client.inspect("feed:user:1")
    assert info.dependencies == ("follows:1", "posts:author:7")
    assert info.registered and info.last_change_seq == published.seq
    assert info.external_version is None

    stats = client.stats()
    assert stats.keys == 3 and stats.edges == 2 and stats.seq == published.seq


def test_publish_accepts_plain_keys_and_external_versions(client: freshd.Client) -> None:
    a = client.publish(["a:1", Change("b:1", external_version=5)])
    assert [r.invalidated for r in a.results] == [1, 1]
    again = client.publish([Change("b:1", external_version=5)])
    assert again.results[0].duplicate and again.seq == a.seq
    assert client.inspect("b:1").external_version == 5


def test_check_batch_answers_in_order(client: freshd.Client) -> None:
    v = client.fill("feed:1", ["posts:1"], ttl_ms=60000).version
    client.publish(["posts:1"])
    batch = client.check_batch([CheckItem("feed:1", v, age_ms=5), ("feed:9", 1)])
    assert [r.freshness for r in batch.results] == [Freshness.STALE, Freshness.UNKNOWN]
    assert [r.decision for r in batch.results] == [Decision.REFETCH, Decision.UNKNOWN]
    assert batch.seq > 0 and batch.epoch > 0


def test_policies(client: freshd.Client) -> None:
    policy = Policy(max_age_ms=5000, revalidate_after_ms=2000, check_sample_rate=0.25)
    set_ = client.set_policy("feed", policy)
    assert set_.namespace == "feed" and not set_.is_default and set_.policy == policy
    assert client.get_policy("feed").policy == policy
    assert client.get_policy("posts").is_default
    assert [p.namespace for p in client.list_policies()] == ["", "feed"]
    v = client.fill("feed:1", [], ttl_ms=60000).version
    assert client.check("feed:1", v).check_sample_rate == 0.25
    client.delete_policy("feed")
    assert client.get_policy("feed").is_default
    with pytest.raises(freshd.NotFound):
        client.delete_policy("feed")


def test_errors_carry_the_status_code(client: freshd.Client) -> None:
    with pytest.raises(freshd.InvalidArgument) as bad:
        client.publish([])
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "changes must not be empty" in bad.value.details
    assert isinstance(bad.value, freshd.FreshdError)

    with pytest.raises(freshd.NotFound):
        client.inspect("nothing")

    s = client.check("k").seq
    client.fill("k", ["d"], ttl_ms=60000, observed_seq=s)
    client.publish(["d"])
    with pytest.raises(freshd.FillRaced) as raced:
        client.fill("k", ["d"], ttl_ms=60000, observed_seq=s)
    assert raced.value.code == grpc.StatusCode.ABORTED and raced.value.code_name == "ABORTED"

    with pytest.raises(freshd.LeaseLost) as lost:
        client.fill("k", [], lease_token=12345)
    assert isinstance(lost.value, freshd.FailedPrecondition)


def test_leases(client: freshd.Client) -> None:
    lease = client.lease("feed:1")
    assert lease.granted and lease.token and lease.ttl_ms > 0
    other = client.lease("feed:1")
    assert not other.granted and other.token == 0 and other.retry_after_ms > 0
    fill = client.fill("feed:1", ["posts:1"], ttl_ms=60000, lease_token=lease.token)
    assert client.check("feed:1", fill.version).freshness is Freshness.FRESH
    assert client.lease("feed:1").granted  # the fill released it
    stats = client.stats()
    assert stats.leases_granted == 2 and stats.leases_contended == 1


def test_purge(client: freshd.Client) -> None:
    v = client.fill("feed:1", ["posts:1"], ttl_ms=60000).version
    dry = client.purge("posts:", dry_run=True, hard=True)
    assert dry.matched == 1 and dry.affected == 2 and not dry.applied
    hard = client.purge("posts:", hard=True)
    assert hard.applied
    check = client.check("feed:1", v)
    assert check.freshness is Freshness.STALE and check.decision is Decision.REFETCH


def test_unreachable_server_is_unavailable() -> None:
    from harness import free_port

    with freshd.Client(f"127.0.0.1:{free_port()}", timeout=2.0) as client:
        with pytest.raises(freshd.Unavailable):
            client.stats()


def test_watch_stream_notices_progress_and_resume(client: freshd.Client) -> None:
    client.fill("feed:1", ["posts:1"], ttl_ms=60000)
    with client.watch(client_id="svc", track=["feed:1"]) as stream:
        assert stream.started.outcome is ResumeOutcome.NEW
        p1 = client.publish(["posts:1"]).seq
        synced = stream.sync(timeout=5)
        assert [(n.key, n.seq, n.cause) for n in synced.notices] == [("feed:1", p1, "posts:1")]
        assert not synced.notices[0].is_repair
        stream.ack(synced.progress.seq)
        token = freshd.ResumeToken(synced.progress.epoch, synced.progress.seq)

    p2 = client.publish(["posts:1"]).seq
    with client.watch(client_id="svc", track=["feed:1"], resume=token) as resumed:
        assert resumed.started.outcome is ResumeOutcome.FROM_HISTORY
        synced = resumed.sync(timeout=5)
        assert [(n.key, n.seq) for n in synced.notices] == [("feed:1", p2)]
        resumed.subscribe(["users:"])
        resumed.sync(timeout=5)  # the subscribe is in force once progress answers
        p3 = client.publish(["users:9"]).seq
        assert [n.seq for n in resumed.sync(timeout=5).notices] == [p3]


def test_watch_stream_buffers_at_most_max_buffered_events(client: freshd.Client) -> None:
    keys = [f"bound:{i}" for i in range(200)]
    with client.watch(track=keys, max_buffered=4) as stream:
        for key in keys:
            client.publish([key])
        # Two hundred notices went out, each on its own; the reader stops
        # once four wait for recv().
        wait_until(lambda: stream.buffered >= 4, what="four events buffered")
        assert stream.buffered == 4
        # Read, everything arrives: nothing was lost to the bound.
        synced = stream.sync(timeout=5)
        assert sorted(n.key for n in synced.notices) == sorted(keys)
        assert synced.resets == ()
        assert stream.buffered == 0


def test_watch_max_buffered_must_be_positive(client: freshd.Client) -> None:
    with pytest.raises(ValueError, match="max_buffered must be at least 1, got 0"):
        client.watch(track=["k"], max_buffered=0)


def test_watch_refused_start_raises(client: freshd.Client) -> None:
    with pytest.raises(freshd.InvalidArgument):
        client.watch(track=[""])


def test_watch_refusals_in_band_leave_the_stream_open(client: freshd.Client) -> None:
    with client.watch(track=["inband:a"], refusals_in_band=True) as stream:
        # Request 2: a good key and an empty one; nothing of it applies.
        sent = stream.track(["inband:b", ""])
        assert sent == 2, "the start was 1"
        synced = stream.sync(timeout=5)
        assert [(r.request, r.code) for r in synced.refused] == [
            (sent, grpc.StatusCode.INVALID_ARGUMENT)
        ]
        assert "track.keys[1] must not be empty" in synced.refused[0].message
        # The stream goes on, with only what was applied.
        client.publish(["inband:a", "inband:b"])
        synced = stream.sync(timeout=5)
        assert [n.key for n in synced.notices] == ["inband:a"]
        assert synced.refused == ()


def test_watch_without_refusals_in_band_ends_on_a_bad_track(client: freshd.Client) -> None:
    with client.watch(track=["inband:a"]) as stream:
        stream.track([""])
        with pytest.raises(freshd.InvalidArgument, match="track.keys\\[0\\]"):
            stream.sync(timeout=5)


def test_watch_new_epoch_resets_everything(client: freshd.Client) -> None:
    epoch = client.stats().epoch
    with client.watch(track=["k"], resume=freshd.ResumeToken(epoch ^ 1, 3)) as stream:
        assert stream.started.outcome is ResumeOutcome.REPAIRED
        synced = stream.sync(timeout=5)
        assert [(r.prefix, r.reason) for r in synced.resets] == [("", freshd.ResetReason.NEW_EPOCH)]
