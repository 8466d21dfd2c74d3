package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.List;

/**
 * Server-wide counters (the answer to Stats).
 *
 * @param keys keys held, registered or not
 * @param edges dependency edges
 * @param shards the server's shards
 * @param seq the last applied seq
 * @param epoch the server's epoch
 * @param uptimeMs milliseconds since start
 * @param expired registrations removed because their TTL ran out
 * @param oversizedPublishes publishes over {@code max_invalidations_per_publish}
 * @param subscribers open Watch streams
 * @param historyNotices notices held for resumes
 * @param historyFloorSeq the oldest seq a token may name to resume from the history
 * @param leasesGranted leases granted
 * @param leasesContended lease requests that found a fill in flight
 * @param leasesHeld leases held now
 * @param purges purges applied
 * @param purgedKeys keys those purges affected
 * @param raw the response message
 */
public record Stats(
        long keys,
        long edges,
        int shards,
        long seq,
        long epoch,
        long uptimeMs,
        long expired,
        long oversizedPublishes,
        List<SubscriberStats> subscribers,
        long historyNotices,
        long historyFloorSeq,
        long leasesGranted,
        long leasesContended,
        long leasesHeld,
        long purges,
        long purgedKeys,
        CoordinatorOuterClass.StatsResponse raw) {

    /**
     * Copies the list.
     *
     * @param keys the {@code keys} component
     * @param edges the {@code edges} component
     * @param shards the {@code shards} component
     * @param seq the {@code seq} component
     * @param epoch the {@code epoch} component
     * @param uptimeMs the {@code uptimeMs} component
     * @param expired the {@code expired} component
     * @param oversizedPublishes the {@code oversizedPublishes} component
     * @param subscribers the {@code subscribers} component
     * @param historyNotices the {@code historyNotices} component
     * @param historyFloorSeq the {@code historyFloorSeq} component
     * @param leasesGranted the {@code leasesGranted} component
     * @param leasesContended the {@code leasesContended} component
     * @param leasesHeld the {@code leasesHeld} component
     * @param purges the {@code purges} component
     * @param purgedKeys the {@code purgedKeys} component
     * @param raw the {@code raw} component
     */
    public Stats {
        subscribers = List.copyOf(subscribers);
    }

    static Stats fromProto(CoordinatorOuterClass.StatsResponse m) {
        return new Stats(
                m.getKeys(),
                m.getEdges(),
                m.getShards(),
                m.getSeq(),
                m.getEpoch(),
                m.getUptimeMs(),
                m.getExpired(),
                m.getOversizedPublishes(),
                m.getSubscribersList().stream().map(SubscriberStats::fromProto).toList(),
                m.getHistoryNotices(),
                m.getHistoryFloorSeq(),
                m.getLeasesGranted(),
                m.getLeasesContended(),
                m.getLeasesHeld(),
                m.getPurges(),
                m.getPurgedKeys(),
                m);
    }
}
