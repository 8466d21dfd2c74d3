package dev.freshd.client;

import java.util.List;

/**
 * What {@link WatchStream#sync} collected up to the progress watermark, in arrival order.
 *
 * @param notices the notices
 * @param resets the resets
 * @param progress the watermark that ended the collection
 * @param refused requests refused before the watermark (streams opened with {@code refusalsInBand})
 */
public record SyncResult(List<Notice> notices, List<Reset> resets, Progress progress, List<Refused> refused) {

    /**
     * Copies the lists.
     *
     * @param notices the {@code notices} component
     * @param resets the {@code resets} component
     * @param progress the {@code progress} component
     * @param refused the {@code refused} component
     */
    public SyncResult {
        notices = List.copyOf(notices);
        resets = List.copyOf(resets);
        refused = List.copyOf(refused);
    }
}
