/**
 * Typed requests and results of the Coordinator API. Field names are those
 * of `proto/freshd/v1/coordinator.proto` in camelCase; 64-bit integers are
 * `number`s (freshd's seqs, versions and epochs stay below 2^53); enums are
 * their names without the prefix (`"FRESH"` for `FRESHNESS_FRESH`).
 *
 * @module
 */
import * as pb from "./gen/freshd/v1/coordinator";
import { statusName } from "./errors";

// ------------------------------------------------------------------ enums

/**
 * Whether a cached copy is the current version, a fact: `FRESH` (current),
 * `STALE` (the key changed since), `UNKNOWN` (no live registration: a miss).
 */
export type Freshness = "UNSPECIFIED" | "FRESH" | "STALE" | "UNKNOWN";

/**
 * What to do with a cached copy, from the namespace's freshness policy:
 * `FRESH` serve it; `REVALIDATE` serve it and refresh it in the background;
 * `REFETCH` go to the origin now; `UNKNOWN` no live registration, a miss.
 */
export type Decision = "UNSPECIFIED" | "FRESH" | "REVALIDATE" | "REFETCH" | "UNKNOWN";

/** Why a Watch stream got a {@link Reset}. */
export type ResetReason = "UNSPECIFIED" | "HISTORY_COMPACTED" | "NEW_EPOCH" | "SLOW_CONSUMER";

/** How a Watch stream started: `NEW`, `FROM_HISTORY` (exact resume) or `REPAIRED`. */
export type ResumeOutcome = "UNSPECIFIED" | "NEW" | "FROM_HISTORY" | "REPAIRED";

function enumName<T extends string>(
  names: Record<number, string>,
  prefix: string,
  value: number,
): T {
  const name = names[value];
  // A value added to the proto after this client maps to UNSPECIFIED.
  if (typeof name !== "string" || !name.startsWith(prefix)) {
    return "UNSPECIFIED" as T;
  }
  return name.slice(prefix.length) as T;
}

/** An enum value by its name without the prefix (freshnessName). @internal */
export const freshnessName = (v: number): Freshness =>
  enumName(pb.Freshness as unknown as Record<number, string>, "FRESHNESS_", v);
/** An enum value by its name without the prefix (decisionName). @internal */
export const decisionName = (v: number): Decision =>
  enumName(pb.Decision as unknown as Record<number, string>, "DECISION_", v);
/** An enum value by its name without the prefix (resetReasonName). @internal */
export const resetReasonName = (v: number): ResetReason =>
  enumName(pb.ResetReason as unknown as Record<number, string>, "RESET_REASON_", v);
/** An enum value by its name without the prefix (resumeOutcomeName). @internal */
export const resumeOutcomeName = (v: number): ResumeOutcome =>
  enumName(pb.ResumeOutcome as unknown as Record<number, string>, "RESUME_OUTCOME_", v);

// --------------------------------------------------------------- requests

/** One change to publish. */
export interface Change {
  /** The key that changed. */
  key: string;
  /**
   * A monotonic number from the source (a database LSN, say): a change whose
   * external version is not above the last one seen for the key is a
   * duplicate, acknowledged without effect.
   */
  externalVersion?: number;
  /** A critical change: caches must not serve a copy from before it. */
  critical?: boolean;
  /** When the producer saw the change (Unix ms); 0 or unset: unknown. */
  eventTimeUnixMs?: number;
}

/** One cached copy to check in a {@link Client.checkBatch}. */
export interface CheckItem {
  /** The key. */
  key: string;
  /** The version stored beside the copy. */
  version: number;
  /** How old the copy is, in ms: the freshness policy decides on it. */
  ageMs?: number;
  /** Whether the copy was already served before this check. */
  served?: boolean;
}

/** A namespace's freshness policy. Durations in ms; 0 means "none". */
export interface Policy {
  /** Hard limit on a copy's age: older copies answer REFETCH. */
  maxAgeMs: number;
  /** A current copy older than this answers REVALIDATE. */
  revalidateAfterMs: number;
  /** A stale (not critical) copy this young or younger answers REVALIDATE. */
  staleWhileRevalidateMs: number;
  /** Let a critical change be served stale like any other. */
  allowStaleOnCritical: boolean;
  /** The share of cache hits clients should version-check, 0 to 1 (unset: 1). */
  checkSampleRate?: number;
}

/** Where a Watch stream stands in the server's history: resume with it. */
export interface ResumeToken {
  /** The epoch of the history. */
  epoch: number;
  /** Every notice up to this seq that matched the stream was received. */
  seq: number;
}

// ---------------------------------------------------------------- results

/** The outcome of one change of a publish. */
export interface ChangeResult {
  /** Keys this change bumped that no earlier change of the call had bumped. */
  invalidated: number;
  /** The change's external version was not above the last one: no effect. */
  duplicate: boolean;
  /** The key's version after the call. */
  version: number;
}

/** What {@link Client.publish} returns. */
export interface PublishResult {
  /** The seq of the publish (the current seq when every change was a duplicate). */
  seq: number;
  /** The server's epoch. */
  epoch: number;
  /** One result per change, in request order. */
  results: ChangeResult[];
}

/** What {@link Client.fill} returns. */
export interface FillResult {
  /** The version to store beside the cached value. */
  version: number;
  /** The seq of the fill. */
  seq: number;
  /** The server's epoch. */
  epoch: number;
  /** The TTL granted, after defaults and caps. */
  ttlMs: number;
}

/** What {@link Client.check} returns: the fact and the policy's decision. */
export interface CheckResult {
  /** Whether the copy is current. */
  freshness: Freshness;
  /** The key's current version (0 when UNKNOWN). */
  version: number;
  /** The critical bit of the key's last change. */
  critical: boolean;
  /** The seq the answer reflects; usable as a fill's `observedSeq`. */
  seq: number;
  /** The server's epoch. */
  epoch: number;
  /** What to do with the copy. */
  decision: Decision;
  /** The share of cache hits the namespace's policy asks clients to check. */
  checkSampleRate: number;
}

/** One answer of a {@link Client.checkBatch}. */
export interface CheckItemResult {
  /** Whether the copy is current. */
  freshness: Freshness;
  /** The key's current version. */
  version: number;
  /** The critical bit of the key's last change. */
  critical: boolean;
  /** What to do with the copy. */
  decision: Decision;
  /** The share of cache hits the key's namespace asks clients to check. */
  checkSampleRate: number;
}

/** What {@link Client.checkBatch} returns, from one consistent state. */
export interface CheckBatchResult {
  /** One result per item, in request order. */
  results: CheckItemResult[];
  /** The seq the answers reflect. */
  seq: number;
  /** The server's epoch. */
  epoch: number;
}

/** Everything freshd holds for one key ({@link Client.inspect}). */
export interface KeyInfo {
  /** The key. */
  key: string;
  /** Its version. */
  version: number;
  /** The seq of the last publish that reached it; 0 if none is known. */
  lastChangeSeq: number;
  /** When that change was applied (Unix ms); 0 if none. */
  lastChangeUnixMs: number;
  /** The producer's event time of that change (Unix ms); 0 if none. */
  eventTimeUnixMs: number;
  /** The critical bit of that change. */
  critical: boolean;
  /** The key's dependency set, sorted. */
  dependencies: string[];
  /** How many keys depend on this one. */
  dependents: number;
  /** Whether a live registration answers checks for the key. */
  registered: boolean;
  /** Milliseconds until the registration expires; 0 when not registered. */
  ttlLeftMs: number;
  /** The last external version seen for the key, if any. */
  externalVersion?: number;
}

/** What {@link Client.lease} returns. */
export interface LeaseResult {
  /** Whether the caller is the filler. */
  granted: boolean;
  /** When granted: pass it to a fill as `leaseToken` (a 64-bit value, hence `bigint`; 0n otherwise). */
  token: bigint;
  /** When granted: the seq the lease observed. */
  seq: number;
  /** When granted: how long the lease lasts; otherwise until the other filler's lease expires. */
  ttlMs: number;
  /** When not granted: the key's current version (0 when unknown). */
  version: number;
  /** When not granted: a suggested wait before checking again. */
  retryAfterMs: number;
  /** The server's epoch. */
  epoch: number;
}

/** What {@link Client.purge} returns. */
export interface PurgeResult {
  /** Keys under the prefix. */
  matched: number;
  /** Those and their transitive dependents. */
  affected: number;
  /** Watch streams that get at least one notice (hard purges only). */
  subscribers: number;
  /** Notices delivered (hard purges only). */
  notices: number;
  /** The purge's seq (the current seq for a dry run). */
  seq: number;
  /** Whether anything changed. */
  applied: boolean;
  /** The server's epoch. */
  epoch: number;
}

/** A namespace's policy as the server holds it. */
export interface NamespacePolicy {
  /** The namespace; empty for the default. */
  namespace: string;
  /** The policy in force. */
  policy: Policy;
  /** The namespace has no policy of its own; this is the default. */
  isDefault: boolean;
}

/** One open Watch stream in {@link Stats}. */
export interface SubscriberStats {
  /** The stream's client id. */
  clientId: string;
  /** The highest seq the client acknowledged. */
  ackedSeq: number;
  /** Seqs between the last fanned-out seq and `ackedSeq`. */
  lag: number;
  /** Notices queued, not yet written to the stream. */
  queued: number;
  /** Keys tracked. */
  trackedKeys: number;
  /** Prefixes watched. */
  prefixes: number;
  /** Times the stream fell behind and was caught up. */
  overflows: number;
  /** Delay from event time to acknowledgement of the last acked batch, ms. */
  ackDelayMs: number;
}

/** Server-wide counters ({@link Client.stats}). */
export interface Stats {
  /** Keys held, registered or not. */
  keys: number;
  /** Dependency edges. */
  edges: number;
  /** Shards of the key map. */
  shards: number;
  /** The last applied seq. */
  seq: number;
  /** The server's epoch. */
  epoch: number;
  /** Milliseconds since start. */
  uptimeMs: number;
  /** Registrations removed because their TTL ran out. */
  expired: number;
  /** Publishes over `max_invalidations_per_publish`. */
  oversizedPublishes: number;
  /** Open Watch streams. */
  subscribers: SubscriberStats[];
  /** Notices held for resumes. */
  historyNotices: number;
  /** The oldest seq a token may name to resume from the history. */
  historyFloorSeq: number;
  /** Leases granted. */
  leasesGranted: number;
  /** Lease requests that found a fill in flight. */
  leasesContended: number;
  /** Leases held now. */
  leasesHeld: number;
  /** Purges applied. */
  purges: number;
  /** Keys purges affected. */
  purgedKeys: number;
}

// ----------------------------------------------------------- watch events

/** One key changed. */
export interface Notice {
  /** The seq of the change. */
  seq: number;
  /** The key. */
  key: string;
  /** The key's version after the change. */
  version: number;
  /**
   * The published key whose change reached this one; empty in a repair, and
   * when it lies outside the stream's watch scope.
   */
  cause: string;
  /** Whether the change was critical. */
  critical: boolean;
  /** The producer's event time of the cause, Unix ms. */
  eventTimeUnixMs: number;
  /**
   * Sent by a repair after a resume or an overflow older than the history,
   * where the change itself is no longer known.
   */
  repair: boolean;
}

/** The first event of a stream. */
export interface WatchStarted {
  /** Discriminates the {@link WatchEvent}s. */
  type: "started";
  /** The server's epoch. */
  epoch: number;
  /** The seq the stream starts from. */
  seq: number;
  /** How the resume went. */
  outcome: ResumeOutcome;
}

/** Notices, in seq order. */
export interface NoticeBatch {
  /** Discriminates the {@link WatchEvent}s. */
  type: "notices";
  /** The notices. */
  notices: Notice[];
}

/** A watermark: every matching notice up to `seq` has been sent. */
export interface Progress {
  /** Discriminates the {@link WatchEvent}s. */
  type: "progress";
  /** The epoch. */
  epoch: number;
  /** The watermark. */
  seq: number;
}

/**
 * Keys under `prefix` may have changed after seq `since` and the server
 * cannot say which: revalidate (or drop) every copy under it got at or
 * before `since`.
 */
export interface Reset {
  /** Discriminates the {@link WatchEvent}s. */
  type: "reset";
  /** The prefix ("" is every key). */
  prefix: string;
  /** The seq after which changes may have been missed. */
  since: number;
  /** Why. */
  reason: ResetReason;
}

/**
 * A `track` or `subscribe` the server refused on a stream opened with
 * `refusalsInBand`: nothing of it was applied and the stream goes on.
 */
export interface Refused {
  /** Discriminates the {@link WatchEvent}s. */
  type: "refused";
  /** Which request: 1 is the start, 2 the request after it, and so on. */
  request: number;
  /** The gRPC status code the request would have ended the stream with. */
  code: number;
  /** The code's name, such as `"INVALID_ARGUMENT"`. */
  codeName: string;
  /** What was wrong. */
  message: string;
}

/** What a {@link WatchStream} yields. */
export type WatchEvent = WatchStarted | NoticeBatch | Progress | Reset | Refused;

// ------------------------------------------------------------- conversions

/**
 * A 64-bit field as a number. freshd's seqs, versions, epochs, counts and
 * durations stay below 2^53; lease tokens, which do not, stay `bigint`.
 * @internal
 */
export function num(value: bigint): number {
  return Number(value);
}

/** A number or bigint as the unsigned 64-bit value of a request. @internal */
export function u64(value: number | bigint | undefined, what: string): bigint {
  if (value === undefined) {
    return 0n;
  }
  if (typeof value === "number" && !Number.isSafeInteger(value)) {
    throw new RangeError(`${what} must be a non-negative integer, got ${value}`);
  }
  const big = BigInt(value);
  if (big < 0n || big >= 1n << 64n) {
    throw new RangeError(`${what} must fit an unsigned 64-bit integer, got ${value}`);
  }
  return big;
}

/** Converts for the wire (changeToPb). @internal */
export function changeToPb(change: Change | string): pb.Change {
  const c = typeof change === "string" ? { key: change } : change;
  return {
    key: c.key,
    externalVersion:
      c.externalVersion === undefined ? undefined : u64(c.externalVersion, "externalVersion"),
    critical: c.critical ?? false,
    eventTimeUnixMs: u64(c.eventTimeUnixMs, "eventTimeUnixMs"),
  };
}

/** Converts for the wire (checkItemToPb). @internal */
export function checkItemToPb(item: CheckItem | readonly [string, number]): pb.CheckItem {
  if (Array.isArray(item)) {
    const [key, version] = item as readonly [string, number];
    return { key, version: u64(version, "version"), ageMs: 0n, served: false };
  }
  const i = item as CheckItem;
  return {
    key: i.key,
    version: u64(i.version, "version"),
    ageMs: u64(i.ageMs, "ageMs"),
    served: i.served ?? false,
  };
}

/** Converts for the wire (policyToPb). @internal */
export function policyToPb(policy: Partial<Policy>): pb.FreshnessPolicy {
  return {
    maxAgeMs: u64(policy.maxAgeMs, "maxAgeMs"),
    revalidateAfterMs: u64(policy.revalidateAfterMs, "revalidateAfterMs"),
    staleWhileRevalidateMs: u64(policy.staleWhileRevalidateMs, "staleWhileRevalidateMs"),
    allowStaleOnCritical: policy.allowStaleOnCritical ?? false,
    checkSampleRate: policy.checkSampleRate,
  };
}

/** Converts for the wire (policyFromPb). @internal */
export function policyFromPb(p: pb.FreshnessPolicy | undefined): Policy {
  const out: Policy = {
    maxAgeMs: num(p?.maxAgeMs ?? 0n),
    revalidateAfterMs: num(p?.revalidateAfterMs ?? 0n),
    staleWhileRevalidateMs: num(p?.staleWhileRevalidateMs ?? 0n),
    allowStaleOnCritical: p?.allowStaleOnCritical ?? false,
  };
  if (p?.checkSampleRate !== undefined) {
    out.checkSampleRate = p.checkSampleRate;
  }
  return out;
}

/** Converts for the wire (namespacePolicyFromPb). @internal */
export function namespacePolicyFromPb(p: pb.NamespacePolicy): NamespacePolicy {
  return { namespace: p.namespace, policy: policyFromPb(p.policy), isDefault: p.isDefault };
}

/** Converts for the wire (publishFromPb). @internal */
export function publishFromPb(r: pb.PublishResponse): PublishResult {
  return {
    seq: num(r.seq),
    epoch: num(r.epoch),
    results: r.results.map((c) => ({
      invalidated: num(c.invalidated),
      duplicate: c.duplicate,
      version: num(c.version),
    })),
  };
}

/** Converts for the wire (fillFromPb). @internal */
export function fillFromPb(r: pb.FillResponse): FillResult {
  return { version: num(r.version), seq: num(r.seq), epoch: num(r.epoch), ttlMs: num(r.ttlMs) };
}

/** Converts for the wire (checkFromPb). @internal */
export function checkFromPb(r: pb.CheckResponse): CheckResult {
  return {
    freshness: freshnessName(r.freshness),
    version: num(r.version),
    critical: r.critical,
    seq: num(r.seq),
    epoch: num(r.epoch),
    decision: decisionName(r.decision),
    checkSampleRate: r.checkSampleRate,
  };
}

/** Converts for the wire (checkBatchFromPb). @internal */
export function checkBatchFromPb(r: pb.CheckBatchResponse): CheckBatchResult {
  return {
    results: r.results.map((x) => ({
      freshness: freshnessName(x.freshness),
      version: num(x.version),
      critical: x.critical,
      decision: decisionName(x.decision),
      checkSampleRate: x.checkSampleRate,
    })),
    seq: num(r.seq),
    epoch: num(r.epoch),
  };
}

/** Converts for the wire (keyInfoFromPb). @internal */
export function keyInfoFromPb(r: pb.InspectResponse): KeyInfo {
  const out: KeyInfo = {
    key: r.key,
    version: num(r.version),
    lastChangeSeq: num(r.lastChangeSeq),
    lastChangeUnixMs: num(r.lastChangeUnixMs),
    eventTimeUnixMs: num(r.eventTimeUnixMs),
    critical: r.critical,
    dependencies: [...r.dependencies],
    dependents: num(r.dependents),
    registered: r.registered,
    ttlLeftMs: num(r.ttlLeftMs),
  };
  if (r.externalVersion !== undefined) {
    out.externalVersion = num(r.externalVersion);
  }
  return out;
}

/** Converts for the wire (leaseFromPb). @internal */
export function leaseFromPb(r: pb.LeaseResponse): LeaseResult {
  return {
    granted: r.granted,
    token: r.token,
    seq: num(r.seq),
    ttlMs: num(r.ttlMs),
    version: num(r.version),
    retryAfterMs: num(r.retryAfterMs),
    epoch: num(r.epoch),
  };
}

/** Converts for the wire (purgeFromPb). @internal */
export function purgeFromPb(r: pb.PurgeResponse): PurgeResult {
  return {
    matched: num(r.matched),
    affected: num(r.affected),
    subscribers: num(r.subscribers),
    notices: num(r.notices),
    seq: num(r.seq),
    applied: r.applied,
    epoch: num(r.epoch),
  };
}

/** Converts for the wire (statsFromPb). @internal */
export function statsFromPb(r: pb.StatsResponse): Stats {
  return {
    keys: num(r.keys),
    edges: num(r.edges),
    shards: r.shards,
    seq: num(r.seq),
    epoch: num(r.epoch),
    uptimeMs: num(r.uptimeMs),
    expired: num(r.expired),
    oversizedPublishes: num(r.oversizedPublishes),
    subscribers: r.subscribers.map((s) => ({
      clientId: s.clientId,
      ackedSeq: num(s.ackedSeq),
      lag: num(s.lag),
      queued: num(s.queued),
      trackedKeys: num(s.trackedKeys),
      prefixes: num(s.prefixes),
      overflows: num(s.overflows),
      ackDelayMs: num(s.ackDelayMs),
    })),
    historyNotices: num(r.historyNotices),
    historyFloorSeq: num(r.historyFloorSeq),
    leasesGranted: num(r.leasesGranted),
    leasesContended: num(r.leasesContended),
    leasesHeld: num(r.leasesHeld),
    purges: num(r.purges),
    purgedKeys: num(r.purgedKeys),
  };
}

/** Converts for the wire (watchEventFromPb). @internal */
export function watchEventFromPb(r: pb.WatchResponse): WatchEvent | undefined {
  const response = r.response;
  switch (response?.$case) {
    case "started":
      return {
        type: "started",
        epoch: num(response.value.epoch),
        seq: num(response.value.seq),
        outcome: resumeOutcomeName(response.value.outcome),
      };
    case "notices":
      return {
        type: "notices",
        notices: response.value.notices.map((n) => ({
          seq: num(n.seq),
          key: n.key,
          version: num(n.version),
          cause: n.cause,
          critical: n.critical,
          eventTimeUnixMs: num(n.eventTimeUnixMs),
          repair: n.repair,
        })),
      };
    case "progress":
      return { type: "progress", epoch: num(response.value.epoch), seq: num(response.value.seq) };
    case "reset":
      return {
        type: "reset",
        prefix: response.value.prefix,
        since: num(response.value.since),
        reason: resetReasonName(response.value.reason),
      };
    case "refused":
      return {
        type: "refused",
        request: num(response.value.request),
        code: response.value.code,
        codeName: statusName(response.value.code),
        message: response.value.message,
      };
    default:
      return undefined; // a kind added to the proto after this client
  }
}
