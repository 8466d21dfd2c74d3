package dev.freshd.client;

/** The Watch stream ended without an error (its client side was closed, or it was cancelled). */
public class StreamEndedException extends IllegalStateException {
    private static final long serialVersionUID = 1L;

    /**
     * An end.
     *
     * @param message what ended
     */
    public StreamEndedException(String message) {
        super(message);
    }
}
