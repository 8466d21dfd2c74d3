package dev.freshd.client;

/**
 * The optional fields of a Purge. Every field defaults to its zero value.
 *
 * @param dryRun only report what the purge would do
 * @param hard copies answer REFETCH at once, and notices go out (default: soft)
 * @param confirm go ahead although more than {@code max_purge_keys} keys are affected
 * @param jitterMs a soft purge's spread; 0: the server's {@code purge_jitter}
 * @param clientId who purges (no-loop); null: the client's default
 */
public record PurgeOptions(
        boolean dryRun,
        boolean hard,
        boolean confirm,
        long jitterMs,
        String clientId) {

    /** Every field at its default. */
    public static final PurgeOptions DEFAULTS = builder().build();

    /**
     * A builder, every field at its default.
     *
     * @return a new builder
     */
    public static Builder builder() {
        return new Builder();
    }

    /** Builds a {@link PurgeOptions}. */
    public static final class Builder {
        private boolean dryRun;
        private boolean hard;
        private boolean confirm;
        private long jitterMs;
        private String clientId;

        private Builder() {}

        /**
         * Sets {@code dryRun}: only report what the purge would do.
         *
         * @param value the value
         * @return this builder
         */
        public Builder dryRun(boolean value) {
            this.dryRun = value;
            return this;
        }

        /**
         * Sets {@code hard}: copies answer REFETCH at once, and notices go out (default: soft).
         *
         * @param value the value
         * @return this builder
         */
        public Builder hard(boolean value) {
            this.hard = value;
            return this;
        }

        /**
         * Sets {@code confirm}: go ahead although more than {@code max_purge_keys} keys are affected.
         *
         * @param value the value
         * @return this builder
         */
        public Builder confirm(boolean value) {
            this.confirm = value;
            return this;
        }

        /**
         * Sets {@code jitterMs}: a soft purge's spread; 0: the server's {@code purge_jitter}.
         *
         * @param value the value
         * @return this builder
         */
        public Builder jitterMs(long value) {
            this.jitterMs = value;
            return this;
        }

        /**
         * Sets {@code clientId}: who purges (no-loop); null: the client's default.
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
         * @return a new {@link PurgeOptions}
         */
        public PurgeOptions build() {
            return new PurgeOptions(dryRun, hard, confirm, jitterMs, clientId);
        }
    }
}
