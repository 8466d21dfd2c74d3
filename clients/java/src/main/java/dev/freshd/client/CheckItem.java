package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.Objects;

/**
 * One copy to check in a {@link FreshdClient#checkBatch CheckBatch}.
 *
 * @param key the key of the cached copy
 * @param version the version stored beside the copy
 * @param ageMs how old the copy is, in milliseconds
 * @param served whether the copy was already served before this check
 */
public record CheckItem(String key, long version, long ageMs, boolean served) {

    /**
     * Checks the fields.
     *
     * @param key the {@code key} component
     * @param version the {@code version} component
     * @param ageMs the {@code ageMs} component
     * @param served the {@code served} component
     */
    public CheckItem {
        Objects.requireNonNull(key, "key");
    }

    /**
     * An item with no age, not served.
     *
     * @param key the key of the cached copy
     * @param version the version stored beside it
     * @return the item
     */
    public static CheckItem of(String key, long version) {
        return new CheckItem(key, version, 0, false);
    }

    /**
     * This item with an age.
     *
     * @param value the copy's age in milliseconds
     * @return a new item
     */
    public CheckItem withAgeMs(long value) {
        return new CheckItem(key, version, value, served);
    }

    /**
     * This item marked as served (or not) before the check.
     *
     * @param value whether the copy was served
     * @return a new item
     */
    public CheckItem withServed(boolean value) {
        return new CheckItem(key, version, ageMs, value);
    }

    CoordinatorOuterClass.CheckItem toProto() {
        return CoordinatorOuterClass.CheckItem.newBuilder()
                .setKey(key)
                .setVersion(version)
                .setAgeMs(ageMs)
                .setServed(served)
                .build();
    }
}
