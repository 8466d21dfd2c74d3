package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The answer to a Purge.
 *
 * @param matched keys under the prefix
 * @param affected those and their transitive dependents
 * @param subscribers Watch streams that get at least one notice (hard purges only)
 * @param notices notices delivered (hard purges only)
 * @param seq the purge's seq (the current seq for a dry run)
 * @param applied whether anything changed
 * @param epoch the server's epoch
 * @param raw the response message
 */
public record PurgeResult(
        long matched,
        long affected,
        long subscribers,
        long notices,
        long seq,
        boolean applied,
        long epoch,
        CoordinatorOuterClass.PurgeResponse raw) {

    static PurgeResult fromProto(CoordinatorOuterClass.PurgeResponse m) {
        return new PurgeResult(
                m.getMatched(), m.getAffected(), m.getSubscribers(), m.getNotices(), m.getSeq(), m.getApplied(),
                m.getEpoch(), m);
    }
}
