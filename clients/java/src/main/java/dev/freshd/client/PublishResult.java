package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.List;

/**
 * The answer to a Publish.
 *
 * @param seq the publish's seq (the current seq when every change was a duplicate)
 * @param epoch the server's epoch
 * @param results one result per change, in request order
 * @param raw the response message
 */
public record PublishResult(long seq, long epoch, List<ChangeResult> results, CoordinatorOuterClass.PublishResponse raw) {

    /**
     * Copies the list.
     *
     * @param seq the {@code seq} component
     * @param epoch the {@code epoch} component
     * @param results the {@code results} component
     * @param raw the {@code raw} component
     */
    public PublishResult {
        results = List.copyOf(results);
    }

    static PublishResult fromProto(CoordinatorOuterClass.PublishResponse m) {
        return new PublishResult(
                m.getSeq(), m.getEpoch(), m.getResultsList().stream().map(ChangeResult::fromProto).toList(), m);
    }
}
