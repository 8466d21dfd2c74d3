package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The answer for one item of a CheckBatch.
 *
 * @param freshness whether the copy is the current version
 * @param version the key's current version (0 when unknown)
 * @param critical the critical bit of the key's last change
 * @param decision what to do with the copy
 * @param checkSampleRate the share of hits the key's namespace policy asks clients to check
 * @param raw the result message
 */
public record CheckItemResult(
        Freshness freshness,
        long version,
        boolean critical,
        Decision decision,
        double checkSampleRate,
        CoordinatorOuterClass.CheckResult raw) {

    static CheckItemResult fromProto(CoordinatorOuterClass.CheckResult m) {
        return new CheckItemResult(
                Freshness.from(m.getFreshness()),
                m.getVersion(),
                m.getCritical(),
                Decision.from(m.getDecision()),
                m.getCheckSampleRate(),
                m);
    }
}
