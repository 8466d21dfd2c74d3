package dev.freshd.client;

/**
 * The optional fields of a Check. Every field defaults to its zero value.
 *
 * @param ageMs how old the cached copy is, in milliseconds
 * @param epoch the epoch the version came from; 0 skips the comparison
 * @param minSeq read your writes: wait until the server applied this seq
 * @param endpoint the API endpoint serving the copy, for the freshness metrics; empty: none
 * @param served whether the copy was already served before this check
 * @param clientId the client's id, as on its Watch stream; null: the client's default
 */
public record CheckOptions(
        long ageMs,
        long epoch,
        long minSeq,
        String endpoint,
        boolean served,
        String clientId) {

    /** Every field at its default. */
    public static final CheckOptions DEFAULTS = builder().build();

    /**
     * A builder, every field at its default.
     *
     * @return a new builder
     */
    public static Builder builder() {
        return new Builder();
    }

    /** Builds a {@link CheckOptions}. */
    public static final class Builder {
        private long ageMs;
        private long epoch;
        private long minSeq;
        private String endpoint;
        private boolean served;
        private String clientId;

        private Builder() {}

        /**
         * Sets {@code ageMs}: how old the cached copy is, in milliseconds.
         *
         * @param value the value
         * @return this builder
         */
        public Builder ageMs(long value) {
            this.ageMs = value;
            return this;
        }

        /**
         * Sets {@code epoch}: the epoch the version came from; 0 skips the comparison.
         *
         * @param value the value
         * @return this builder
         */
        public Builder epoch(long value) {
            this.epoch = value;
            return this;
        }

        /**
         * Sets {@code minSeq}: read your writes: wait until the server applied this seq.
         *
         * @param value the value
         * @return this builder
         */
        public Builder minSeq(long value) {
            this.minSeq = value;
            return this;
        }

        /**
         * Sets {@code endpoint}: the API endpoint serving the copy, for the freshness metrics; empty: none.
         *
         * @param value the value
         * @return this builder
         */
        public Builder endpoint(String value) {
            this.endpoint = value;
            return this;
        }

        /**
         * Sets {@code served}: whether the copy was already served before this check.
         *
         * @param value the value
         * @return this builder
         */
        public Builder served(boolean value) {
            this.served = value;
            return this;
        }

        /**
         * Sets {@code clientId}: the client's id, as on its Watch stream; null: the client's default.
         *
         * @param value the value
         * @return this builder
         */
        public Builder clientId(String value) {
            this.clientId = value;
            return this;
        }

        /**
         * The options.
         *
         * @return a new {@link CheckOptions}
         */
        public CheckOptions build() {
            return new CheckOptions(ageMs, epoch, minSeq, endpoint, served, clientId);
        }
    }
}
