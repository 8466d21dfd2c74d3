package dev.freshd.client;

/**
 * The optional fields of a CheckBatch. Every field defaults to its zero value.
 *
 * @param epoch the epoch the versions came from; 0 skips the comparison
 * @param minSeq read your writes: wait until the server applied this seq
 * @param endpoint the API endpoint serving the copies; empty: none
 * @param clientId the client's id, as on its Watch stream; null: the client's default
 */
public record CheckBatchOptions(
        long epoch,
        long minSeq,
        String endpoint,
        String clientId) {

    /** Every field at its default. */
    public static final CheckBatchOptions DEFAULTS = builder().build();

    /**
     * A builder, every field at its default.
     *
     * @return a new builder
     */
    public static Builder builder() {
        return new Builder();
    }

    /** Builds a {@link CheckBatchOptions}. */
    public static final class Builder {
        private long epoch;
        private long minSeq;
        private String endpoint;
        private String clientId;

        private Builder() {}

        /**
         * Sets {@code epoch}: the epoch the versions came from; 0 skips the comparison.
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
         * Sets {@code endpoint}: the API endpoint serving the copies; empty: none.
         *
         * @param value the value
         * @return this builder
         */
        public Builder endpoint(String value) {
            this.endpoint = value;
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
         * @return a new {@link CheckBatchOptions}
         */
        public CheckBatchOptions build() {
            return new CheckBatchOptions(epoch, minSeq, endpoint, clientId);
        }
    }
}
