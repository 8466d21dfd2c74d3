package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.List;

/**
 * The answer to a CheckBatch, from one consistent state.
 *
 * @param results one result per item, in request order
 * @param seq the seq the answers reflect
 * @param epoch the server's epoch
 * @param raw the response message
 */
public record CheckBatchResult(
        List<CheckItemResult> results, long seq, long epoch, CoordinatorOuterClass.CheckBatchResponse raw) {

    /**
     * Copies the list.
     *
     * @param results the {@code results} component
     * @param seq the {@code seq} component
     * @param epoch the {@code epoch} component
     * @param raw the {@code raw} component
     */
    public CheckBatchResult {
        results = List.copyOf(results);
    }

    static CheckBatchResult fromProto(CoordinatorOuterClass.CheckBatchResponse m) {
        return new CheckBatchResult(
                m.getResultsList().stream().map(CheckItemResult::fromProto).toList(), m.getSeq(), m.getEpoch(), m);
    }
}
