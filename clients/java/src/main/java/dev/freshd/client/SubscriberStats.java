package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * One open Watch stream, as {@link Stats} reports it.
 *
 * @param clientId the stream's client id
 * @param ackedSeq the highest seq the client acknowledged
 * @param lag seqs between the last fanned-out seq and the acknowledged one
 * @param queued notices queued, not yet written to the stream
 * @param trackedKeys keys tracked
 * @param prefixes prefixes watched
 * @param overflows times the stream fell behind and was caught up
 * @param ackDelayMs delay from the producer's event time to the acknowledgement, in ms
 */
public record SubscriberStats(
        String clientId,
        long ackedSeq,
        long lag,
        long queued,
        long trackedKeys,
        long prefixes,
        long overflows,
        long ackDelayMs) {

    static SubscriberStats fromProto(CoordinatorOuterClass.SubscriberStats m) {
        return new SubscriberStats(
                m.getClientId(),
                m.getAckedSeq(),
                m.getLag(),
                m.getQueued(),
                m.getTrackedKeys(),
                m.getPrefixes(),
                m.getOverflows(),
                m.getAckDelayMs());
    }
}
