package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * Where a Watch stream stands in the server's history: resume with it.
 *
 * @param epoch the history the seq belongs to
 * @param seq every notice up to this seq that matched the stream was received
 */
public record ResumeToken(long epoch, long seq) {

    CoordinatorOuterClass.ResumeToken toProto() {
        return CoordinatorOuterClass.ResumeToken.newBuilder().setEpoch(epoch).setSeq(seq).build();
    }
}
