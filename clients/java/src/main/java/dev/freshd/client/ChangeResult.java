package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;

/**
 * The outcome of one change of a publish.
 *
 * @param invalidated keys this change bumped that no earlier change of the same call had bumped
 * @param duplicate the change's external version was not above the last one seen: no effect
 * @param version the key's version after the call
 */
public record ChangeResult(long invalidated, boolean duplicate, long version) {

    static ChangeResult fromProto(CoordinatorOuterClass.ChangeResult m) {
        return new ChangeResult(m.getInvalidated(), m.getDuplicate(), m.getVersion());
    }
}
