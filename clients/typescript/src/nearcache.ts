/**
 * NearCache: an in-process cache kept right by freshd.
 *
 * Values live in this process (a bounded LRU with a TTL); freshd holds their
 * versions and dependencies. A miss takes the key's fill lease, reads the
 * origin and fills; a hit checks its version as the namespace's policy says
 * and acts on the decision; one Watch stream drops copies as soon as they
 * change.
 *
 * @module
 */
import { randomUUID } from "node:crypto";
import { hostname } from "node:os";
import { performance } from "node:perf_hooks";
import { setTimeout as sleep } from "node:timers/promises";

import { status } from "@grpc/grpc-js";

import { Client, type ClientOptions } from "./client";
import { FailedPrecondition, FillRaced, FreshdError, InternalError } from "./errors";
import type {
  CheckItemResult,
  Notice,
  NoticeBatch,
  Progress,
  Reset,
  ResumeToken,
  WatchStarted,
} from "./types";
import type { WatchStream } from "./watch";

/** What a {@link Loader} returns: the value and the keys it depends on. */
export interface Loaded<V> {
  /** The value read from the origin. */
  value: V;
  /** Keys whose change must invalidate this one. */
  dependencies: Iterable<string>;
}

/** Reads a value from the origin. */
export type Loader<V> = () => Loaded<V> | Promise<Loaded<V>>;

/** Settings of a {@link NearCache}. */
export interface NearCacheOptions {
  /** Names what serves the copies (an API route, say) in the server's hit-age metric. */
  endpoint?: string;
  /** The client id of checks, fills and the Watch stream (default: the client's, else a unique one). */
  clientId?: string;
  /** Bounds the LRU (keep it at or below the server's `max_tracked_keys`). Default 10,000. */
  maxEntries?: number;
  /** A copy's local life and the fill's TTL, ms. Default 300,000. */
  ttlMs?: number;
  /** Keep one Watch stream that drops changed copies. Default true. */
  watch?: boolean;
  /** Send concurrent checks as one CheckBatch. Default true. */
  batchChecks?: boolean;
  /** Serve a hit at once and check it in the background; the decision applies to the next get. */
  serveBeforeCheck?: boolean;
  /** Lease requests to repeat while another caller fills, before reading without the lease. Default 10. */
  leaseRetries?: number;
  /** The longest wait between lease requests, ms. Default 500. */
  maxLeaseWaitMs?: number;
  /** Origin reads per get when fills race with changes. Default 3. */
  fillAttempts?: number;
  /** How often the Watch stream asks for progress, ms. Default 5,000. */
  progressIntervalMs?: number;
  /** The Watch stream's reconnect backoff, `[first, longest]` ms, with jitter. Default `[50, 5000]`. */
  reconnectBackoffMs?: readonly [number, number];
  /** How long a namespace's learned `check_sample_rate` holds, ms. Default 10,000. */
  sampleRateRefreshMs?: number;
  /**
   * When freshd fails: `"origin"` (default) reads the origin and returns the
   * value uncached; `"raise"` rejects with the {@link FreshdError}.
   */
  onError?: "origin" | "raise";
}

/** Counters of a {@link NearCache}, since it was created. */
export interface NearCacheStats {
  /** Gets served from the local copy (checked or not). */
  hits: number;
  /** Gets that found no local copy. */
  misses: number;
  /** Copies served although known to be behind (REVALIDATE on a stale copy, or while another caller held the lease). */
  staleServes: number;
  /** Background refreshes started by a REVALIDATE decision. */
  revalidations: number;
  /** Hits whose check said REFETCH or UNKNOWN: read from the origin at once. */
  refetches: number;
  /** Notices received on the Watch stream and applied. */
  noticesApplied: number;
  /** Resets applied (a prefix dropped) and new epochs seen (all dropped). */
  resets: number;
  /** Repair notices applied: changes the stream had missed. */
  repairs: number;
  /** Version checks sent (single or in a batch). */
  checks: number;
  /** Hits served without a check (`check_sample_rate` below 1). */
  uncheckedHits: number;
  /** Origin reads (loader calls). */
  loads: number;
  /** Fills refused because the key or a dependency changed during the read, or the lease ran out. */
  fillRaces: number;
  /** Lease requests that found another filler. */
  leaseWaits: number;
  /** Copies dropped because a notice, reset, new epoch or check said so. */
  invalidations: number;
  /** Copies dropped for room (LRU) or age (local TTL). */
  evictions: number;
  /** Watch stream (re)connections. */
  watchConnects: number;
  /** Gets answered from the origin, uncached, because freshd failed. */
  bypasses: number;
}

function newStats(): NearCacheStats {
  return {
    hits: 0,
    misses: 0,
    staleServes: 0,
    revalidations: 0,
    refetches: 0,
    noticesApplied: 0,
    resets: 0,
    repairs: 0,
    checks: 0,
    uncheckedHits: 0,
    loads: 0,
    fillRaces: 0,
    leaseWaits: 0,
    invalidations: 0,
    evictions: 0,
    watchConnects: 0,
    bypasses: 0,
  };
}

interface Entry<V> {
  value: V;
  version: number;
  epoch: number;
  /** performance.now() when the origin read began: the copy's age starts there. */
  loadedAt: number;
  expiresAt: number;
}

type Outcome<V> = { ok: true; value: V } | { ok: false };

interface Grant {
  token: bigint;
  observedSeq: number;
  epoch: number;
}

const OUTAGE_CODES = new Set<number>([
  status.UNAVAILABLE,
  status.DEADLINE_EXCEEDED,
  status.INTERNAL,
  status.UNKNOWN,
  status.CANCELLED,
]);

/** freshd could not answer (as opposed to refusing a bad request). */
function isOutage(error: unknown): error is FreshdError {
  return error instanceof FreshdError && OUTAGE_CODES.has(error.code);
}

/** The part of a key before its first `:` (the whole key without one). */
export function namespaceOf(key: string): string {
  const i = key.indexOf(":");
  return i < 0 ? key : key.slice(0, i);
}

const uniform = (low: number, high: number): number => low + Math.random() * (high - low);

/**
 * An in-process cache whose copies freshd keeps right.
 *
 * `get(key, loader)` returns a value; `loader()` reads the origin and
 * returns `{ value, dependencies }`.
 *
 * - A miss tracks the key on the Watch stream, takes the key's fill lease,
 *   reads the origin, fills with the lease token and the dependencies, and
 *   keeps value, version, epoch and load time. Concurrent misses of one key
 *   read the origin once. When another caller holds the lease it serves its
 *   own copy if that copy is not behind, else waits `retry_after_ms` and
 *   asks again (`leaseRetries` times, then reads without the lease).
 * - A hit checks the copy's version (sampled at the namespace's
 *   `check_sample_rate`). FRESH: serve. REVALIDATE: serve and refresh in the
 *   background (one refresh per key at a time). REFETCH or UNKNOWN: read the
 *   origin now. Concurrent checks go out as one CheckBatch.
 * - One Watch stream tracks the cached keys: a notice drops the copy it
 *   names, a reset every copy under its prefix, a new epoch everything. It
 *   acknowledges what it applied and resumes after a disconnect with its
 *   token, backing off with jitter.
 *
 * When freshd fails (`onError: "origin"`, the default) a get reads the
 * origin and returns the value uncached.
 */
export class NearCache<V> {
  /** The client it calls freshd with. */
  readonly client: Client;
  /** The client id of its checks, fills and Watch stream. */
  readonly clientId: string;

  /** @internal */ readonly endpoint: string;
  private readonly maxEntries: number;
  private readonly ttlMs: number;
  private readonly serveBeforeCheck: boolean;
  private readonly leaseRetries: number;
  private readonly maxLeaseWaitMs: number;
  private readonly fillAttempts: number;
  private readonly sampleRateRefreshMs: number;
  private readonly onError: "origin" | "raise";
  private readonly ownsClient: boolean;

  private readonly entries = new Map<string, Entry<V>>();
  private readonly inflight = new Map<string, Promise<Outcome<V>>>();
  /** Keys being read from the origin -> the highest version a notice named meanwhile. */
  private readonly loading = new Map<string, number>();
  /** @internal */ readonly tracked = new Set<string>();
  private readonly sampleRates = new Map<string, { rate: number; at: number }>();
  private readonly counters = newStats();
  private readonly batcher: CheckBatcher<V> | undefined;
  private readonly watcher: Watcher<V> | undefined;
  private closed = false;

  /**
   * A cache over `client` (a {@link Client}, or a target to make one from
   * with `clientOptions`; such a client is closed with the cache).
   */
  constructor(
    client: Client | string,
    options: NearCacheOptions = {},
    clientOptions?: ClientOptions,
  ) {
    if (
      options.onError !== undefined &&
      options.onError !== "origin" &&
      options.onError !== "raise"
    ) {
      throw new TypeError('onError must be "origin" or "raise"');
    }
    const maxEntries = options.maxEntries ?? 10_000;
    if (!Number.isInteger(maxEntries) || maxEntries < 1) {
      throw new RangeError("maxEntries must be at least 1");
    }
    this.ownsClient = typeof client === "string";
    this.client = typeof client === "string" ? new Client(client, clientOptions) : client;
    this.endpoint = options.endpoint ?? "";
    this.clientId =
      options.clientId ||
      this.client.clientId ||
      `${hostname()}-${process.pid}-${randomUUID().slice(0, 8)}`;
    this.maxEntries = maxEntries;
    this.ttlMs = options.ttlMs ?? 300_000;
    this.serveBeforeCheck = options.serveBeforeCheck ?? false;
    this.leaseRetries = options.leaseRetries ?? 10;
    this.maxLeaseWaitMs = options.maxLeaseWaitMs ?? 500;
    this.fillAttempts = Math.max(1, options.fillAttempts ?? 3);
    this.sampleRateRefreshMs = options.sampleRateRefreshMs ?? 10_000;
    this.onError = options.onError ?? "origin";
    this.batcher = options.batchChecks === false ? undefined : new CheckBatcher(this);
    if (options.watch !== false) {
      this.watcher = new Watcher(
        this,
        options.progressIntervalMs ?? 5000,
        options.reconnectBackoffMs ?? [50, 5000],
      );
      this.watcher.start();
    }
  }

  // ------------------------------------------------------------ lifecycle

  /** Stops the Watch stream and the background work; closes a client it made. */
  async close(): Promise<void> {
    if (this.closed) {
      return;
    }
    this.closed = true;
    await this.watcher?.stop();
    // Background refreshes end on their own; wait for them.
    await Promise.allSettled([...this.inflight.values()]);
    if (this.ownsClient) {
      this.client.close();
    }
  }

  // ------------------------------------------------------------- reading

  /** A snapshot of the counters. */
  get stats(): NearCacheStats {
    return { ...this.counters };
  }

  /** How many copies are held. */
  get size(): number {
    return this.entries.size;
  }

  /** Whether a live local copy of `key` is held. */
  has(key: string): boolean {
    const entry = this.entries.get(key);
    return entry !== undefined && entry.expiresAt > performance.now();
  }

  /** The local copy, if any, without checking or counting anything. */
  peek(key: string): V | undefined {
    return this.entries.get(key)?.value;
  }

  /** `{ version, epoch }` of the local copy, if any. */
  versionOf(key: string): { version: number; epoch: number } | undefined {
    const entry = this.entries.get(key);
    return entry === undefined ? undefined : { version: entry.version, epoch: entry.epoch };
  }

  /** Whether the Watch stream is connected. */
  get watching(): boolean {
    return this.watcher?.connected ?? false;
  }

  /** The epoch the Watch stream last started in. */
  get watchEpoch(): number | undefined {
    return this.watcher?.epoch;
  }

  /** The Watch stream's resume token. */
  get resumeToken(): ResumeToken | undefined {
    const token = this.watcher?.token;
    return token === undefined ? undefined : { ...token };
  }

  /** Waits until the Watch stream is connected; false after `timeoutMs`. */
  async waitWatching(timeoutMs = 5000): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    while (performance.now() < deadline) {
      if (this.watching) return true;
      await sleep(10);
    }
    return this.watching;
  }

  /** Drops the local copy of a key. */
  invalidate(key: string): void {
    if (this.entries.delete(key)) {
      this.untrackIfUnused(key);
    }
  }

  /** Drops every local copy. */
  clear(): void {
    const keys = [...this.entries.keys()];
    this.entries.clear();
    for (const key of keys) this.untrackIfUnused(key);
  }

  // ----------------------------------------------------------------- get

  /**
   * The value of `key`: the local copy when freshd says it may be served,
   * else `loader()`'s value (see the class documentation). Rejects with what
   * the loader threw, or with a {@link FreshdError} that is not an outage
   * (or any, with `onError: "raise"`).
   */
  async get(key: string, loader: Loader<V>): Promise<V> {
    if (this.closed) {
      throw new Error("the NearCache is closed");
    }
    let entry = this.entries.get(key);
    if (entry !== undefined && entry.expiresAt <= performance.now()) {
      this.drop(key, true);
      entry = undefined;
    }
    if (entry === undefined) {
      this.counters.misses += 1;
      return this.load(key, loader, undefined);
    }
    this.entries.delete(key); // most recently used: to the end
    this.entries.set(key, entry);

    if (!this.shouldCheck(key)) {
      this.counters.hits += 1;
      this.counters.uncheckedHits += 1;
      return entry.value;
    }
    if (this.serveBeforeCheck) {
      this.counters.hits += 1;
      void this.checkAfterServe(key, entry, loader);
      return entry.value;
    }
    let result: CheckItemResult;
    try {
      result = await this.check(key, entry, false);
    } catch (e) {
      return this.bypass(key, loader, e);
    }
    return this.act(key, entry, result, loader);
  }

  private async act(
    key: string,
    entry: Entry<V>,
    result: CheckItemResult,
    loader: Loader<V>,
  ): Promise<V> {
    if (result.decision === "FRESH") {
      this.counters.hits += 1;
      return entry.value;
    }
    if (result.decision === "REVALIDATE") {
      this.counters.hits += 1;
      if (result.freshness === "STALE") this.counters.staleServes += 1;
      this.refreshInBackground(key, loader);
      return entry.value;
    }
    // REFETCH, UNKNOWN (or a decision this client does not know). The key
    // stays tracked: it is read again at once.
    this.counters.refetches += 1;
    if (this.entries.get(key) === entry) this.drop(key, false, false);
    return this.load(key, loader, entry);
  }

  private async checkAfterServe(key: string, entry: Entry<V>, loader: Loader<V>): Promise<void> {
    let result: CheckItemResult;
    try {
      result = await this.check(key, entry, true);
    } catch {
      return; // the next get checks again
    }
    if (result.decision === "FRESH") return;
    if (result.decision === "REVALIDATE") {
      if (result.freshness === "STALE") this.counters.staleServes += 1;
      this.refreshInBackground(key, loader);
      return;
    }
    this.counters.refetches += 1;
    if (result.freshness === "STALE") this.counters.staleServes += 1;
    if (this.entries.get(key) === entry) this.drop(key, false);
  }

  private shouldCheck(key: string): boolean {
    const known = this.sampleRates.get(namespaceOf(key));
    const rate = known === undefined ? 1 : known.rate;
    return rate >= 1 || Math.random() < rate;
  }

  private async bypass(key: string, loader: Loader<V>, error: unknown): Promise<V> {
    if (this.onError === "raise" || !isOutage(error)) throw error;
    this.counters.bypasses += 1;
    this.counters.loads += 1;
    return (await loader()).value;
  }

  // --------------------------------------------------------------- checks

  private check(key: string, entry: Entry<V>, served: boolean): Promise<CheckItemResult> {
    const ageMs = Math.max(0, Math.floor(performance.now() - entry.loadedAt));
    this.counters.checks += 1;
    if (this.batcher !== undefined) {
      return this.batcher.check({ key, version: entry.version, ageMs, epoch: entry.epoch, served });
    }
    return this.checkOne(key, entry.version, ageMs, entry.epoch, served);
  }

  /** @internal */
  async checkOne(
    key: string,
    version: number,
    ageMs: number,
    epoch: number,
    served: boolean,
  ): Promise<CheckItemResult> {
    const r = await this.client.check(key, version, {
      ageMs,
      epoch,
      endpoint: this.endpoint,
      served,
      clientId: this.clientId,
    });
    this.learnSampleRate(key, r.checkSampleRate);
    return {
      freshness: r.freshness,
      version: r.version,
      critical: r.critical,
      decision: r.decision,
      checkSampleRate: r.checkSampleRate,
    };
  }

  /** @internal */
  learnSampleRate(key: string, rate: number): void {
    this.sampleRates.set(namespaceOf(key), { rate, at: performance.now() });
  }

  /** @internal */
  sampleRateStale(key: string): boolean {
    const known = this.sampleRates.get(namespaceOf(key));
    return known === undefined || performance.now() - known.at > this.sampleRateRefreshMs;
  }

  // ---------------------------------------------------------------- loads

  private refreshInBackground(key: string, loader: Loader<V>): void {
    if (this.inflight.has(key) || this.closed) return;
    this.counters.revalidations += 1;
    void this.startLoad(key, loader, undefined, true);
  }

  private startLoad(
    key: string,
    loader: Loader<V>,
    previous: Entry<V> | undefined,
    background: boolean,
  ): Promise<Outcome<V>> {
    let settle!: (p: Promise<Outcome<V>>) => void;
    const promise = new Promise<Outcome<V>>((resolve) => {
      settle = resolve;
    });
    this.inflight.set(key, promise);
    const run = async (): Promise<Outcome<V>> => {
      try {
        return await this.fetch(key, loader, previous, background);
      } catch (e) {
        if (background) return { ok: false };
        throw e;
      } finally {
        if (this.inflight.get(key) === promise) this.inflight.delete(key);
        this.untrackIfUnused(key);
      }
    };
    settle(run());
    if (background) promise.catch(() => undefined);
    return promise;
  }

  private async load(key: string, loader: Loader<V>, previous: Entry<V> | undefined): Promise<V> {
    for (;;) {
      const outcome = await (this.inflight.get(key) ??
        this.startLoad(key, loader, previous, false));
      if (outcome.ok) return outcome.value;
      // A background refresh gave up (another caller holds the lease): read
      // the origin ourselves.
    }
  }

  private async fetch(
    key: string,
    loader: Loader<V>,
    previous: Entry<V> | undefined,
    background: boolean,
  ): Promise<Outcome<V>> {
    this.track(key);
    // Make sure the track is in force before the origin read: a change
    // after it is then either refused at fill time or noticed.
    await this.watcher?.sync(1000);

    let value: V | undefined;
    let read = false;
    for (let attempt = 0; attempt < this.fillAttempts; attempt++) {
      let grant: Grant | Entry<V> | null;
      try {
        grant = await this.acquire(key, previous, background);
      } catch (e) {
        if (background) throw e;
        return { ok: true, value: await this.bypass(key, loader, e) };
      }
      if (grant === null) return { ok: false }; // background, another caller is filling
      if (!("token" in grant)) {
        this.counters.staleServes += 1; // our own copy, while another caller fills
        return { ok: true, value: grant.value };
      }
      this.loading.set(key, 0);
      try {
        const loadedAt = performance.now();
        this.counters.loads += 1;
        const loaded = await loader();
        value = loaded.value;
        read = true;
        let fill;
        try {
          fill = await this.client.fill(key, [...loaded.dependencies], {
            ttlMs: this.ttlMs,
            observedSeq: grant.observedSeq,
            epoch: grant.epoch,
            leaseToken: grant.token,
            clientId: this.clientId,
          });
        } catch (e) {
          if (e instanceof FillRaced || e instanceof FailedPrecondition) {
            // Changed during the read, or the lease ran out: read again
            // under a new lease.
            this.counters.fillRaces += 1;
            previous = undefined;
            continue;
          }
          if (background || this.onError === "raise" || !isOutage(e)) throw e;
          this.counters.bypasses += 1;
          return { ok: true, value };
        }
        const noticed = this.loading.get(key) ?? 0;
        if (noticed <= fill.version && !this.closed) {
          const ttl = fill.ttlMs === 0 ? this.ttlMs : Math.min(this.ttlMs, fill.ttlMs);
          this.store(key, {
            value,
            version: fill.version,
            epoch: fill.epoch,
            loadedAt,
            expiresAt: loadedAt + ttl,
          });
        }
        return { ok: true, value };
      } finally {
        this.loading.delete(key);
      }
    }
    // Every attempt raced with a change: return the last read uncached.
    if (!read) throw new Error(`no origin read of ${key} succeeded`);
    return { ok: true, value: value as V };
  }

  /** The key's lease; a copy to serve meanwhile; or null (background: give up). */
  private async acquire(
    key: string,
    previous: Entry<V> | undefined,
    background: boolean,
  ): Promise<Grant | Entry<V> | null> {
    for (let i = 0; i <= this.leaseRetries; i++) {
      const lease = await this.client.lease(key);
      if (lease.granted) return { token: lease.token, observedSeq: 0, epoch: lease.epoch };
      this.counters.leaseWaits += 1;
      if (background) return null;
      if (
        previous !== undefined &&
        previous.epoch === lease.epoch &&
        lease.version !== 0 &&
        previous.version >= lease.version
      ) {
        return previous;
      }
      const wait = lease.retryAfterMs || 50;
      await sleep(Math.min(wait, this.maxLeaseWaitMs) * uniform(0.8, 1.2));
    }
    // The other filler takes too long: read without the lease, with a seq
    // observed before the read (no client id: this checks no copy).
    const check = await this.client.check(key, 0, { clientId: "" });
    return { token: 0n, observedSeq: check.seq, epoch: check.epoch };
  }

  // ---------------------------------------------------- the local copies

  private store(key: string, entry: Entry<V>): void {
    this.entries.delete(key);
    this.entries.set(key, entry);
    this.track(key);
    while (this.entries.size > this.maxEntries) {
      const oldest = this.entries.keys().next().value as string;
      this.entries.delete(oldest);
      this.counters.evictions += 1;
      this.untrackIfUnused(oldest);
    }
  }

  private drop(key: string, evicted: boolean, untrack = true): void {
    if (this.entries.delete(key)) {
      if (evicted) this.counters.evictions += 1;
      else this.counters.invalidations += 1;
      if (untrack) this.untrackIfUnused(key);
    }
  }

  private track(key: string): void {
    if (!this.tracked.has(key)) {
      this.tracked.add(key);
      this.watcher?.send((s) => s.track([key]));
    }
  }

  private untrackIfUnused(key: string): void {
    if (this.tracked.has(key) && !this.entries.has(key) && !this.inflight.has(key)) {
      this.tracked.delete(key);
      this.watcher?.send((s) => s.untrack([key]));
    }
  }

  // Called by the watcher.

  /** @internal */
  applyNotice(notice: Notice, epoch: number): void {
    this.counters.noticesApplied += 1;
    if (notice.repair) this.counters.repairs += 1;
    const loading = this.loading.get(notice.key);
    if (loading !== undefined) this.loading.set(notice.key, Math.max(loading, notice.version));
    const entry = this.entries.get(notice.key);
    if (entry !== undefined && (entry.epoch !== epoch || notice.version > entry.version)) {
      this.drop(notice.key, false);
    }
  }

  /** @internal */
  applyReset(prefix: string): void {
    this.counters.resets += 1;
    for (const key of [...this.entries.keys()]) {
      if (key.startsWith(prefix)) this.drop(key, false);
    }
    for (const key of this.loading.keys()) {
      if (key.startsWith(prefix)) this.loading.set(key, Number.POSITIVE_INFINITY);
    }
  }

  /** @internal */
  countConnect(): void {
    this.counters.watchConnects += 1;
  }
}

interface Pending {
  key: string;
  version: number;
  ageMs: number;
  epoch: number;
  served: boolean;
  resolve: (result: CheckItemResult) => void;
  reject: (error: unknown) => void;
}

/**
 * Sends the checks of concurrent gets together: the checks of one turn of
 * the event loop, and those queued while a call is in flight, go out as one
 * CheckBatch. A namespace whose sample rate is unknown or old gets a single
 * Check, which carries it.
 */
class CheckBatcher<V> {
  static readonly MAX_BATCH = 1000;
  private pending: Pending[] = [];
  private flushing = false;

  constructor(private readonly cache: NearCache<V>) {}

  check(item: Omit<Pending, "resolve" | "reject">): Promise<CheckItemResult> {
    return new Promise((resolve, reject) => {
      this.pending.push({ ...item, resolve, reject });
      if (!this.flushing) {
        this.flushing = true;
        setImmediate(() => void this.flush());
      }
    });
  }

  private async flush(): Promise<void> {
    try {
      while (this.pending.length > 0) {
        await this.send(this.pending.splice(0, CheckBatcher.MAX_BATCH));
      }
    } finally {
      this.flushing = false;
    }
  }

  private async send(taken: Pending[]): Promise<void> {
    const cache = this.cache;
    const singles: Pending[] = [];
    const byEpoch = new Map<number, Pending[]>();
    const learning = new Set<string>();
    for (const item of taken) {
      const ns = namespaceOf(item.key);
      if (taken.length === 1 || (!learning.has(ns) && cache.sampleRateStale(item.key))) {
        learning.add(ns);
        singles.push(item);
      } else {
        const group = byEpoch.get(item.epoch) ?? [];
        group.push(item);
        byEpoch.set(item.epoch, group);
      }
    }
    for (const item of singles) {
      try {
        item.resolve(
          await cache.checkOne(item.key, item.version, item.ageMs, item.epoch, item.served),
        );
      } catch (e) {
        item.reject(e);
      }
    }
    for (const [epoch, items] of byEpoch) {
      try {
        const answer = await cache.client.checkBatch(
          items.map((i) => ({ key: i.key, version: i.version, ageMs: i.ageMs, served: i.served })),
          { epoch, endpoint: cache.endpoint, clientId: cache.clientId },
        );
        items.forEach((item, i) => {
          const result = answer.results[i];
          if (result === undefined) {
            item.reject(new InternalError(status.INTERNAL, "no answer for the item", "CheckBatch"));
          } else {
            item.resolve(result);
          }
        });
      } catch (e) {
        for (const item of items) item.reject(e);
      }
    }
  }
}

/**
 * The Watch stream of a NearCache: (re)connects with backoff and jitter,
 * applies what arrives, acknowledges it and asks for progress.
 */
class Watcher<V> {
  connected = false;
  epoch: number | undefined;
  token: ResumeToken | undefined;
  private stream: WatchStream | undefined;
  private acked = 0;
  private epochResetPending = false;
  private generation = 0;
  private progressAsked = 0;
  private progressSeen = 0;
  private readonly waiters = new Set<{
    wanted: number;
    generation: number;
    done: (ok: boolean) => void;
  }>();
  private stopped = false;
  private readonly stopping = new AbortController();
  private ticker: NodeJS.Timeout | undefined;
  private running: Promise<void> | undefined;

  constructor(
    private readonly cache: NearCache<V>,
    private readonly progressIntervalMs: number,
    private readonly backoff: readonly [number, number],
  ) {}

  start(): void {
    this.running = this.run();
    this.ticker = setInterval(() => {
      if (this.connected) {
        this.progressAsked += 1;
        this.send((s) => s.requestProgress());
      }
    }, this.progressIntervalMs);
    this.ticker.unref();
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.stopping.abort();
    clearInterval(this.ticker);
    this.stream?.cancel();
    await this.running;
  }

  /** Sends on the current stream, if any (a send on a closing one is dropped: the next start carries the tracked keys). */
  send(request: (stream: WatchStream) => void): void {
    const stream = this.stream;
    if (stream === undefined || stream.isEnded) return;
    try {
      request(stream);
    } catch {
      // The stream ended meanwhile.
    }
  }

  /**
   * Asks for progress and waits for it: every filter change sent before is
   * then in force. False when not connected or after `timeoutMs`.
   */
  sync(timeoutMs: number): Promise<boolean> {
    if (!this.connected || this.stream === undefined) return Promise.resolve(false);
    this.progressAsked += 1;
    const wanted = this.progressAsked;
    const generation = this.generation;
    this.send((s) => s.requestProgress());
    return new Promise((resolve) => {
      const waiter = {
        wanted,
        generation,
        done: (ok: boolean) => {
          clearTimeout(timer);
          this.waiters.delete(waiter);
          resolve(ok);
        },
      };
      const timer = setTimeout(() => waiter.done(false), timeoutMs);
      this.waiters.add(waiter);
    });
  }

  private wake(): void {
    for (const waiter of [...this.waiters]) {
      if (waiter.generation !== this.generation) waiter.done(false);
      else if (this.progressSeen >= waiter.wanted) waiter.done(true);
    }
  }

  private async run(): Promise<void> {
    let failures = 0;
    while (!this.stopped) {
      if (await this.connectAndRead()) failures = 0;
      if (this.stopped) return;
      failures += 1;
      const [low, high] = this.backoff;
      const delay = Math.min(high, low * 2 ** Math.min(failures - 1, 16));
      try {
        await sleep(delay * uniform(0.5, 1), undefined, { signal: this.stopping.signal });
      } catch {
        return; // stopped
      }
    }
  }

  /** One stream, until it ends. True when it got as far as `started`. */
  private async connectAndRead(): Promise<boolean> {
    const cache = this.cache;
    const stream = cache.client.openWatch({
      clientId: cache.clientId,
      track: [...cache.tracked].sort(),
      resume: this.token,
    });
    this.stream = stream;
    this.progressAsked = 0;
    this.progressSeen = 0;
    this.acked = 0;
    let started = false;
    try {
      this.onStarted(await stream.started);
      started = true;
      for await (const event of stream) {
        switch (event.type) {
          case "notices":
            this.onNotices(event);
            break;
          case "progress":
            this.onProgress(event);
            break;
          case "reset":
            this.onReset(event);
            break;
          default:
            break;
        }
      }
    } catch {
      // The stream failed (the server went away, say): resume with the token.
    } finally {
      stream.cancel();
      this.stream = undefined;
      this.connected = false;
      this.generation += 1;
      this.wake();
    }
    return started;
  }

  private ack(seq: number): void {
    if (seq > this.acked) {
      this.acked = seq;
      this.send((s) => s.ack(seq));
    }
  }

  private onStarted(started: WatchStarted): void {
    if (this.epoch !== undefined && started.epoch !== this.epoch) {
      // The server lost its history: versions from the old one mean
      // nothing. (Its NEW_EPOCH reset follows; it finds nothing left to
      // drop and is not counted again.)
      this.cache.applyReset("");
      this.token = undefined;
      this.epochResetPending = true;
    }
    this.epoch = started.epoch;
    if (this.token === undefined || this.token.epoch !== started.epoch) {
      this.token = { epoch: started.epoch, seq: started.seq };
    }
    this.connected = true;
    this.cache.countConnect();
  }

  private onNotices(batch: NoticeBatch): void {
    const last = batch.notices[batch.notices.length - 1];
    if (last === undefined) return;
    this.epochResetPending = false;
    const epoch = this.epoch ?? 0;
    for (const notice of batch.notices) this.cache.applyNotice(notice, epoch);
    this.token = { epoch, seq: last.seq };
    this.ack(last.seq);
  }

  private onProgress(progress: Progress): void {
    this.epochResetPending = false;
    this.token = { epoch: progress.epoch, seq: progress.seq };
    this.ack(progress.seq);
    this.progressSeen += 1;
    this.wake();
  }

  private onReset(reset: Reset): void {
    if (this.epochResetPending && reset.prefix === "" && reset.reason === "NEW_EPOCH") {
      this.epochResetPending = false;
      return;
    }
    this.cache.applyReset(reset.prefix);
  }
}
