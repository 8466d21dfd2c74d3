package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/** Why a Watch stream got a {@link Reset}. */
public enum ResetReason {
    /** The server sent no value, or one this client does not know. */
    UNSPECIFIED,
    /** The resume token is older than the server's history. */
    HISTORY_COMPACTED,
    /** The resume token is from another epoch: the server lost its history. */
    NEW_EPOCH,
    /** The stream fell behind and its queue overflowed. */
    SLOW_CONSUMER;

    static ResetReason from(CoordinatorOuterClass.ResetReason value) {
        switch (value) {
            case RESET_REASON_HISTORY_COMPACTED: return HISTORY_COMPACTED;
            case RESET_REASON_NEW_EPOCH: return NEW_EPOCH;
            case RESET_REASON_SLOW_CONSUMER: return SLOW_CONSUMER;
            default: return UNSPECIFIED;
        }
    }
}
