package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/** Whether a cached copy is the current version: a fact. What to do about it is the {@link Decision}. */
public enum Freshness {
    /** The server sent no value, or one this client does not know. */
    UNSPECIFIED,
    /** The cached version is the current one. */
    FRESH,
    /** The key changed since the cached version. */
    STALE,
    /** freshd holds no live registration for the key: treat the copy as a miss. */
    UNKNOWN;

    static Freshness from(CoordinatorOuterClass.Freshness value) {
        switch (value) {
            case FRESHNESS_FRESH: return FRESH;
            case FRESHNESS_STALE: return STALE;
            case FRESHNESS_UNKNOWN: return UNKNOWN;
            default: return UNSPECIFIED;
        }
    }
}
