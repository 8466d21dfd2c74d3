package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.Objects;
import java.util.OptionalLong;

/**
 * One change to publish.
 *
 * @param key the key that changed
 * @param externalVersion a monotonic number from the source (such as a database LSN); a change whose
 *     external version is not above the last one seen for the key is a duplicate, without effect
 * @param critical a critical change: caches must not serve a copy from before it
 * @param eventTimeUnixMs when the producer saw the change (Unix ms); 0: the server's receive time
 */
public record Change(String key, OptionalLong externalVersion, boolean critical, long eventTimeUnixMs) {

    /**
     * Checks the fields.
     *
     * @param key the {@code key} component
     * @param externalVersion the {@code externalVersion} component
     * @param critical the {@code critical} component
     * @param eventTimeUnixMs the {@code eventTimeUnixMs} component
     */
    public Change {
        Objects.requireNonNull(key, "key");
        Objects.requireNonNull(externalVersion, "externalVersion");
    }

    /**
     * A plain change of one key.
     *
     * @param key the key that changed
     * @return the change
     */
    public static Change of(String key) {
        return new Change(key, OptionalLong.empty(), false, 0);
    }

    /**
     * This change with an external version.
     *
     * @param version the source's monotonic number
     * @return a new change
     */
    public Change withExternalVersion(long version) {
        return new Change(key, OptionalLong.of(version), critical, eventTimeUnixMs);
    }

    /**
     * This change marked critical (or not).
     *
     * @param value whether caches must not serve a copy from before it
     * @return a new change
     */
    public Change withCritical(boolean value) {
        return new Change(key, externalVersion, value, eventTimeUnixMs);
    }

    /**
     * This change with the producer's event time.
     *
     * @param unixMs Unix milliseconds
     * @return a new change
     */
    public Change withEventTimeUnixMs(long unixMs) {
        return new Change(key, externalVersion, critical, unixMs);
    }

    CoordinatorOuterClass.Change toProto() {
        CoordinatorOuterClass.Change.Builder b = CoordinatorOuterClass.Change.newBuilder()
                .setKey(key)
                .setCritical(critical)
                .setEventTimeUnixMs(eventTimeUnixMs);
        externalVersion.ifPresent(b::setExternalVersion);
        return b.build();
    }
}
