package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * One key changed.
 *
 * @param seq the seq of the change
 * @param key the key
 * @param version the key's version after the change
 * @param cause the published key whose change reached this one; empty in a repair, and when it
 *     lies outside the stream's watch scope
 * @param critical the critical bit
 * @param eventTimeUnixMs the producer's event time of the cause, Unix ms
 * @param repair whether a repair sent it
 * @param raw the notice message
 */
public record Notice(
        long seq, String key, long version, String cause, boolean critical, long eventTimeUnixMs,
        boolean repair, CoordinatorOuterClass.Notice raw) {

    /**
     * Whether a repair sent it (after a resume or an overflow older than the history), where the
     * change itself is no longer known.
     *
     * @return the notice's {@code repair} flag
     */
    public boolean isRepair() {
        return repair;
    }

    static Notice fromProto(CoordinatorOuterClass.Notice m) {
        return new Notice(
                m.getSeq(), m.getKey(), m.getVersion(), m.getCause(), m.getCritical(), m.getEventTimeUnixMs(),
                m.getRepair(), m);
    }
}
