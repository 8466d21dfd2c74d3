package dev.freshd.client;

/**
 * The optional fields of a Fill. Every field defaults to its zero value.
 *
 * @param ttlMs how long the registration lives; 0: the server's {@code default_ttl}
 * @param observedSeq a seq got before the origin read; a change after it refuses the fill (ABORTED)
 * @param epoch the epoch {@code observedSeq} came from; 0 skips the comparison
 * @param leaseToken the token of a lease from Lease; 0: none
 * @param clientId the client's id, as on its Watch stream; null: the client's default
 */
public record FillOptions(
        long ttlMs,
        long observedSeq,
        long epoch,
        long leaseToken,
        String clientId) {

    /** Every field at its default. */
    public static final FillOptions DEFAULTS = builder().build();

    /**
     * A builder, every field at its default.
     *
     * @return a new builder
     */
    public static Builder builder() {
        return new Builder();
    }

    /** Builds a {@link FillOptions}. */
    public static final class Builder {
        private long ttlMs;
        private long observedSeq;
        private long epoch;
        private long leaseToken;
        private String clientId;

        private Builder() {}

        /**
         * Sets {@code ttlMs}: how long the registration lives; 0: the server's {@code default_ttl}.
         *
         * @param value the value
         * @return this builder
         */
        public Builder ttlMs(long value) {
            this.ttlMs = value;
            return this;
        }

        /**
         * Sets {@code observedSeq}: a seq got before the origin read; a change after it refuses the fill (ABORTED).
         *
         * @param value the value
         * @return this builder
         */
        public Builder observedSeq(long value) {
            this.observedSeq = value;
            return this;
        }

        /**
         * Sets {@code epoch}: the epoch {@code observedSeq} came from; 0 skips the comparison.
         *
         * @param value the value
         * @return this builder
         */
        public Builder epoch(long value) {
            this.epoch = value;
            return this;
        }

        /**
         * Sets {@code leaseToken}: the token of a lease from Lease; 0: none.
         *
         * @param value the value
         * @return this builder
         */
        public Builder leaseToken(long value) {
            this.leaseToken = value;
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
         * @return a new {@link FillOptions}
         */
        public FillOptions build() {
            return new FillOptions(ttlMs, observedSeq, epoch, leaseToken, clientId);
        }
    }
}
