package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/** How a Watch stream started: new, resumed from the history, or repaired. */
public enum ResumeOutcome {
    /** The server sent no value, or one this client does not know. */
    UNSPECIFIED,
    /** No token: notices from now on. */
    NEW,
    /** The token was inside the history: missed notices follow, exactly. */
    FROM_HISTORY,
    /** The token was older or from another epoch: repair notices and resets follow. */
    REPAIRED;

    static ResumeOutcome from(CoordinatorOuterClass.ResumeOutcome value) {
        switch (value) {
            case RESUME_OUTCOME_NEW: return NEW;
            case RESUME_OUTCOME_FROM_HISTORY: return FROM_HISTORY;
            case RESUME_OUTCOME_REPAIRED: return REPAIRED;
            default: return UNSPECIFIED;
        }
    }
}
