package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * Keys under {@code prefix} may have changed after seq {@code since} and the server cannot say
 * which: revalidate (or drop) every copy under the prefix got at or before {@code since}.
 *
 * @param prefix the prefix (empty: every key)
 * @param since the seq after which changes may have been missed
 * @param reason why
 * @param raw the message
 */
public record Reset(String prefix, long since, ResetReason reason, CoordinatorOuterClass.Reset raw)
        implements WatchEvent {

    static Reset fromProto(CoordinatorOuterClass.Reset m) {
        return new Reset(m.getPrefix(), m.getSince(), ResetReason.from(m.getReason()), m);
    }
}
