package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.List;

/**
 * Notices, in seq order.
 *
 * @param notices the notices
 * @param raw the batch message
 */
public record NoticeBatch(List<Notice> notices, CoordinatorOuterClass.NoticeBatch raw) implements WatchEvent {

    /**
     * Copies the list.
     *
     * @param notices the {@code notices} component
     * @param raw the {@code raw} component
     */
    public NoticeBatch {
        notices = List.copyOf(notices);
    }

    static NoticeBatch fromProto(CoordinatorOuterClass.NoticeBatch m) {
        return new NoticeBatch(m.getNoticesList().stream().map(Notice::fromProto).toList(), m);
    }
}
