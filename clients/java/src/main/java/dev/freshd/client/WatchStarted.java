package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The first message of a Watch stream.
 *
 * @param epoch the server's epoch
 * @param seq the seq the stream starts from
 * @param outcome new, resumed from the history, or repaired
 * @param raw the message
 */
public record WatchStarted(long epoch, long seq, ResumeOutcome outcome, CoordinatorOuterClass.WatchStarted raw)
        implements WatchEvent {

    static WatchStarted fromProto(CoordinatorOuterClass.WatchStarted m) {
        return new WatchStarted(m.getEpoch(), m.getSeq(), ResumeOutcome.from(m.getOutcome()), m);
    }
}
