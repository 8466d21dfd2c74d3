package dev.freshd.client;

import java.util.Arrays;
import java.util.List;
import java.util.Objects;

/**
 * What a {@link NearCache.Loader} read from the origin: the value and the keys it depends on.
 *
 * @param value the value (may be null)
 * @param dependencies keys whose change must invalidate the cached value
 * @param <V> the value's type
 */
public record Loaded<V>(V value, List<String> dependencies) {

    /**
     * Copies the list.
     *
     * @param value the {@code value} component
     * @param dependencies the {@code dependencies} component
     */
    public Loaded {
        dependencies = List.copyOf(Objects.requireNonNull(dependencies, "dependencies"));
    }

    /**
     * A value and its dependencies.
     *
     * @param value the value
     * @param dependencies the keys it depends on
     * @param <V> the value's type
     * @return the loaded value
     */
    public static <V> Loaded<V> of(V value, String... dependencies) {
        return new Loaded<>(value, Arrays.asList(dependencies));
    }
}
