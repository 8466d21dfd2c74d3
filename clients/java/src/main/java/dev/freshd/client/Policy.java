package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.Objects;
import java.util.OptionalDouble;

/**
 * A namespace's freshness policy. Durations in milliseconds; 0 means "none".
 *
 * @param maxAgeMs hard limit on a copy's age: older copies answer REFETCH
 * @param revalidateAfterMs a current copy older than this answers REVALIDATE
 * @param staleWhileRevalidateMs a stale (not critical) copy this young or younger answers REVALIDATE
 *     instead of REFETCH
 * @param allowStaleOnCritical let a critical change be served stale like any other
 * @param checkSampleRate the share of cache hits clients should version-check, 0 to 1 (empty: 1)
 */
public record Policy(
        long maxAgeMs,
        long revalidateAfterMs,
        long staleWhileRevalidateMs,
        boolean allowStaleOnCritical,
        OptionalDouble checkSampleRate) {

    /**
     * Checks the fields.
     *
     * @param maxAgeMs the {@code maxAgeMs} component
     * @param revalidateAfterMs the {@code revalidateAfterMs} component
     * @param staleWhileRevalidateMs the {@code staleWhileRevalidateMs} component
     * @param allowStaleOnCritical the {@code allowStaleOnCritical} component
     * @param checkSampleRate the {@code checkSampleRate} component
     */
    public Policy {
        Objects.requireNonNull(checkSampleRate, "checkSampleRate");
    }

    /**
     * A builder, every field at its default.
     *
     * @return a new builder
     */
    public static Builder builder() {
        return new Builder();
    }

    CoordinatorOuterClass.FreshnessPolicy toProto() {
        CoordinatorOuterClass.FreshnessPolicy.Builder b = CoordinatorOuterClass.FreshnessPolicy.newBuilder()
                .setMaxAgeMs(maxAgeMs)
                .setRevalidateAfterMs(revalidateAfterMs)
                .setStaleWhileRevalidateMs(staleWhileRevalidateMs)
                .setAllowStaleOnCritical(allowStaleOnCritical);
        checkSampleRate.ifPresent(b::setCheckSampleRate);
        return b.build();
    }

    static Policy fromProto(CoordinatorOuterClass.FreshnessPolicy m) {
        return new Policy(
                m.getMaxAgeMs(),
                m.getRevalidateAfterMs(),
                m.getStaleWhileRevalidateMs(),
                m.getAllowStaleOnCritical(),
                m.hasCheckSampleRate() ? OptionalDouble.of(m.getCheckSampleRate()) : OptionalDouble.empty());
    }

    /** Builds a {@link Policy}. */
    public static final class Builder {
        private long maxAgeMs;
        private long revalidateAfterMs;
        private long staleWhileRevalidateMs;
        private boolean allowStaleOnCritical;
        private OptionalDouble checkSampleRate = OptionalDouble.empty();

        private Builder() {}

        /**
         * Sets {@code max_age_ms}.
         *
         * @param value milliseconds, 0: none
         * @return this builder
         */
        public Builder maxAgeMs(long value) {
            maxAgeMs = value;
            return this;
        }

        /**
         * Sets {@code revalidate_after_ms}.
         *
         * @param value milliseconds, 0: never
         * @return this builder
         */
        public Builder revalidateAfterMs(long value) {
            revalidateAfterMs = value;
            return this;
        }

        /**
         * Sets {@code stale_while_revalidate_ms}.
         *
         * @param value milliseconds, 0: never
         * @return this builder
         */
        public Builder staleWhileRevalidateMs(long value) {
            staleWhileRevalidateMs = value;
            return this;
        }

        /**
         * Sets {@code allow_stale_on_critical}.
         *
         * @param value whether critical changes may be served stale
         * @return this builder
         */
        public Builder allowStaleOnCritical(boolean value) {
            allowStaleOnCritical = value;
            return this;
        }

        /**
         * Sets {@code check_sample_rate}.
         *
         * @param value the share of hits to check, 0 to 1
         * @return this builder
         */
        public Builder checkSampleRate(double value) {
            checkSampleRate = OptionalDouble.of(value);
            return this;
        }

        /**
         * The policy.
         *
         * @return a new policy
         */
        public Policy build() {
            return new Policy(maxAgeMs, revalidateAfterMs, staleWhileRevalidateMs, allowStaleOnCritical, checkSampleRate);
        }
    }
}
