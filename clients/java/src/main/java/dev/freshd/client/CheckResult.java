package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The answer to a Check: the fact and the policy's decision.
 *
 * @param freshness whether the copy is the current version
 * @param version the key's current version (0 when unknown)
 * @param critical the critical bit of the key's last change
 * @param seq the seq the answer reflects; usable as a Fill's observed seq
 * @param epoch the server's epoch
 * @param decision what to do with the copy
 * @param checkSampleRate the share of hits the namespace's policy asks clients to check
 * @param raw the response message
 */
public record CheckResult(
        Freshness freshness,
        long version,
        boolean critical,
        long seq,
        long epoch,
        Decision decision,
        double checkSampleRate,
        CoordinatorOuterClass.CheckResponse raw) {

    static CheckResult fromProto(CoordinatorOuterClass.CheckResponse m) {
        return new CheckResult(
                Freshness.from(m.getFreshness()),
                m.getVersion(),
                m.getCritical(),
                m.getSeq(),
                m.getEpoch(),
                Decision.from(m.getDecision()),
                m.getCheckSampleRate(),
                m);
    }
}
