package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/** What a cache should do with its copy, from the namespace's freshness policy. */
public enum Decision {
    /** The server sent no value, or one this client does not know. */
    UNSPECIFIED,
    /** Serve the copy. */
    FRESH,
    /** Serve the copy, and refresh it from the origin in the background. */
    REVALIDATE,
    /** Go to the origin now. */
    REFETCH,
    /** freshd holds no live registration: treat the copy as a miss. */
    UNKNOWN;

    static Decision from(CoordinatorOuterClass.Decision value) {
        switch (value) {
            case DECISION_FRESH: return FRESH;
            case DECISION_REVALIDATE: return REVALIDATE;
            case DECISION_REFETCH: return REFETCH;
            case DECISION_UNKNOWN: return UNKNOWN;
            default: return UNSPECIFIED;
        }
    }
}
