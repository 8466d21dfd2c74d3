package dev.freshd.client;

/**
 * Counters of a {@link NearCache}, since it was created.
 *
 * @param hits gets served from the local copy (checked or not)
 * @param misses gets that found no local copy
 * @param staleServes copies served although known to be behind (a stale copy with a REVALIDATE
 *     decision, or a copy served while another caller held the key's lease)
 * @param revalidations background refreshes started by a REVALIDATE decision
 * @param refetches hits whose check said REFETCH or UNKNOWN: read from the origin at once
 * @param noticesApplied notices received on the Watch stream and applied
 * @param resets resets applied (a prefix dropped) and new epochs seen (all dropped)
 * @param repairs repair notices applied: changes the stream had missed
 * @param checks version checks sent (single or in a batch)
 * @param uncheckedHits hits served without a check ({@code check_sample_rate} below 1)
 * @param loads origin reads (loader calls)
 * @param fillRaces fills refused because the key or a dependency changed during the read, or
 *     because the lease ran out: read again
 * @param leaseWaits lease requests that found another filler
 * @param invalidations copies dropped because a notice, reset, new epoch or check said so
 * @param evictions copies dropped for room (LRU) or age (local TTL)
 * @param watchConnects Watch stream (re)connections
 * @param bypasses gets answered from the origin, uncached, because freshd failed
 */
public record NearCacheStats(
        long hits,
        long misses,
        long staleServes,
        long revalidations,
        long refetches,
        long noticesApplied,
        long resets,
        long repairs,
        long checks,
        long uncheckedHits,
        long loads,
        long fillRaces,
        long leaseWaits,
        long invalidations,
        long evictions,
        long watchConnects,
        long bypasses) {}
