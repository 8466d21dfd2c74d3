package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * A watermark: every notice up to {@code seq} that matches the stream has been sent.
 *
 * @param epoch the server's epoch
 * @param seq the watermark
 * @param raw the message
 */
public record Progress(long epoch, long seq, CoordinatorOuterClass.Progress raw) implements WatchEvent {

    static Progress fromProto(CoordinatorOuterClass.Progress m) {
        return new Progress(m.getEpoch(), m.getSeq(), m);
    }
}
