package dev.freshd.client;

import java.time.Duration;
import java.util.List;
import java.util.Objects;

/**
 * How to open a Watch stream: the {@code WatchStart} fields, and how much to buffer.
 *
 * @param clientId names the client, for no-loop and for Stats; null: the client's default
 * @param noLoop send no notice caused by a publish with this client id
 * @param resume resume after a disconnect; null: start from now
 * @param track exact keys to track from the start
 * @param subscribe prefixes to watch from the start
 * @param refusalsInBand answer a later refused track or subscribe with a {@link Refused} event
 *     instead of ending the stream
 * @param maxBuffered events read from the server and not yet taken; past it the stream stops
 *     reading and the server's flow control takes over
 * @param startTimeout how long to wait for {@code started}; null: the client's timeout
 */
public record WatchOptions(
        String clientId,
        boolean noLoop,
        ResumeToken resume,
        List<String> track,
        List<String> subscribe,
        boolean refusalsInBand,
        int maxBuffered,
        Duration startTimeout) {

    /** Events buffered by default. */
    public static final int DEFAULT_MAX_BUFFERED = 1024;

    /**
     * Copies the lists and checks the bound.
     *
     * @param clientId the {@code clientId} component
     * @param noLoop the {@code noLoop} component
     * @param resume the {@code resume} component
     * @param track the {@code track} component
     * @param subscribe the {@code subscribe} component
     * @param refusalsInBand the {@code refusalsInBand} component
     * @param maxBuffered the {@code maxBuffered} component
     * @param startTimeout the {@code startTimeout} component
     */
    public WatchOptions {
        track = List.copyOf(Objects.requireNonNull(track, "track"));
        subscribe = List.copyOf(Objects.requireNonNull(subscribe, "subscribe"));
        if (maxBuffered < 1) {
            throw new IllegalArgumentException("maxBuffered must be at least 1, got " + maxBuffered);
        }
    }

    /**
     * A builder, every field at its default.
     *
     * @return a new builder
     */
    public static Builder builder() {
        return new Builder();
    }

    /** Builds {@link WatchOptions}. */
    public static final class Builder {
        private String clientId;
        private boolean noLoop;
        private ResumeToken resume;
        private List<String> track = List.of();
        private List<String> subscribe = List.of();
        private boolean refusalsInBand;
        private int maxBuffered = DEFAULT_MAX_BUFFERED;
        private Duration startTimeout;

        private Builder() {}

        /**
         * Sets the client id.
         *
         * @param value the id
         * @return this builder
         */
        public Builder clientId(String value) {
            clientId = value;
            return this;
        }

        /**
         * Sets no-loop.
         *
         * @param value whether to skip notices caused by this client id's publishes
         * @return this builder
         */
        public Builder noLoop(boolean value) {
            noLoop = value;
            return this;
        }

        /**
         * Resumes from a token.
         *
         * @param value the token, or null to start from now
         * @return this builder
         */
        public Builder resume(ResumeToken value) {
            resume = value;
            return this;
        }

        /**
         * Keys to track from the start.
         *
         * @param keys the keys
         * @return this builder
         */
        public Builder track(List<String> keys) {
            track = keys;
            return this;
        }

        /**
         * Keys to track from the start.
         *
         * @param keys the keys
         * @return this builder
         */
        public Builder track(String... keys) {
            return track(List.of(keys));
        }

        /**
         * Prefixes to watch from the start.
         *
         * @param prefixes the prefixes
         * @return this builder
         */
        public Builder subscribe(List<String> prefixes) {
            subscribe = prefixes;
            return this;
        }

        /**
         * Prefixes to watch from the start.
         *
         * @param prefixes the prefixes
         * @return this builder
         */
        public Builder subscribe(String... prefixes) {
            return subscribe(List.of(prefixes));
        }

        /**
         * Sets refusals in band.
         *
         * @param value whether refused tracks and subscribes arrive as {@link Refused} events
         * @return this builder
         */
        public Builder refusalsInBand(boolean value) {
            refusalsInBand = value;
            return this;
        }

        /**
         * Sets the buffer bound.
         *
         * @param value events, at least 1
         * @return this builder
         */
        public Builder maxBuffered(int value) {
            maxBuffered = value;
            return this;
        }

        /**
         * Sets how long to wait for {@code started}.
         *
         * @param value the wait; null: the client's timeout
         * @return this builder
         */
        public Builder startTimeout(Duration value) {
            startTimeout = value;
            return this;
        }

        /**
         * The options.
         *
         * @return new {@link WatchOptions}
         */
        public WatchOptions build() {
            return new WatchOptions(clientId, noLoop, resume, track, subscribe, refusalsInBand, maxBuffered, startTimeout);
        }
    }
}
