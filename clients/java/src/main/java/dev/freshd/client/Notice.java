package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * One key changed.
 *
 * @param seq the seq of the change
 * @param key the key
 * @param version the key's version after the change
 * @param cause the published key whose change reached this one; empty in a repair
 * @param critical the critical bit
 * @param eventTimeUnixMs the producer's event time of the cause, Unix ms
 * @param raw the notice message
 */
public record Notice(
        long seq, String key, long version, String cause, boolean critical, long eventTimeUnixMs,
        CoordinatorOuterClass.Notice raw) {

    /**
     * Whether a repair sent it (after a resume older than the history, or an overflow), where the
     * cause is no longer known.
     *
     * @return true when the cause is empty
     */
    public boolean isRepair() {
        return cause.isEmpty();
    }

    static Notice fromProto(CoordinatorOuterClass.Notice m) {
        return new Notice(
                m.getSeq(), m.getKey(), m.getVersion(), m.getCause(), m.getCritical(), m.getEventTimeUnixMs(), m);
    }
}
