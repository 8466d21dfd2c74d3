package dev.freshd.client;

import freshd.v1.CoordinatorOuterClass;
import java.util.List;
import java.util.OptionalLong;

/**
 * Everything freshd holds for one key (the answer to Inspect).
 *
 * @param key the key
 * @param version its version
 * @param lastChangeSeq the seq of the last publish that reached it; 0 if none is known
 * @param lastChangeUnixMs when that change was applied (Unix ms); 0 if none
 * @param eventTimeUnixMs the producer's event time of that change (Unix ms); 0 if none
 * @param critical the critical bit of that change
 * @param dependencies the key's dependency set, sorted
 * @param dependents how many keys depend on this one
 * @param registered whether a live registration answers checks for the key
 * @param ttlLeftMs milliseconds until the registration expires; 0 when not registered
 * @param externalVersion the last external version seen for the key, if any
 * @param raw the response message
 */
public record KeyInfo(
        String key,
        long version,
        long lastChangeSeq,
        long lastChangeUnixMs,
        long eventTimeUnixMs,
        boolean critical,
        List<String> dependencies,
        long dependents,
        boolean registered,
        long ttlLeftMs,
        OptionalLong externalVersion,
        CoordinatorOuterClass.InspectResponse raw) {

    /**
     * Copies the list.
     *
     * @param key the {@code key} component
     * @param version the {@code version} component
     * @param lastChangeSeq the {@code lastChangeSeq} component
     * @param lastChangeUnixMs the {@code lastChangeUnixMs} component
     * @param eventTimeUnixMs the {@code eventTimeUnixMs} component
     * @param critical the {@code critical} component
     * @param dependencies the {@code dependencies} component
     * @param dependents the {@code dependents} component
     * @param registered the {@code registered} component
     * @param ttlLeftMs the {@code ttlLeftMs} component
     * @param externalVersion the {@code externalVersion} component
     * @param raw the {@code raw} component
     */
    public KeyInfo {
        dependencies = List.copyOf(dependencies);
    }

    static KeyInfo fromProto(CoordinatorOuterClass.InspectResponse m) {
        return new KeyInfo(
                m.getKey(),
                m.getVersion(),
                m.getLastChangeSeq(),
                m.getLastChangeUnixMs(),
                m.getEventTimeUnixMs(),
                m.getCritical(),
                m.getDependenciesList(),
                m.getDependents(),
                m.getRegistered(),
                m.getTtlLeftMs(),
                m.hasExternalVersion() ? OptionalLong.of(m.getExternalVersion()) : OptionalLong.empty(),
                m);
    }
}
