package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The answer to a Fill.
 *
 * @param version the version to store beside the cached value
 * @param seq the fill's seq
 * @param epoch the server's epoch
 * @param ttlMs the TTL granted, after defaults and caps
 * @param raw the response message
 */
public record FillResult(long version, long seq, long epoch, long ttlMs, CoordinatorOuterClass.FillResponse raw) {

    static FillResult fromProto(CoordinatorOuterClass.FillResponse m) {
        return new FillResult(m.getVersion(), m.getSeq(), m.getEpoch(), m.getTtlMs(), m);
    }
}
