package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The answer to a Lease.
 *
 * @param granted whether the caller is the filler
 * @param token when granted: pass it to Fill
 * @param seq when granted: the seq the lease observed
 * @param ttlMs when granted, how long the lease lasts; otherwise until the other filler's lease expires
 * @param version when not granted: the key's current version (0 when unknown)
 * @param retryAfterMs when not granted: a suggested wait before asking again
 * @param epoch the server's epoch
 * @param raw the response message
 */
public record LeaseResult(
        boolean granted,
        long token,
        long seq,
        long ttlMs,
        long version,
        long retryAfterMs,
        long epoch,
        CoordinatorOuterClass.LeaseResponse raw) {

    static LeaseResult fromProto(CoordinatorOuterClass.LeaseResponse m) {
        return new LeaseResult(
                m.getGranted(), m.getToken(), m.getSeq(), m.getTtlMs(), m.getVersion(), m.getRetryAfterMs(),
                m.getEpoch(), m);
    }
}
