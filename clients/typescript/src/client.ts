/**
 * The Coordinator client: one Promise-returning method per RPC of
 * `freshd.v1.Coordinator`, typed requests and results, failures as
 * {@link FreshdError}s.
 *
 * @module
 */
import { readFileSync } from "node:fs";

import {
  credentials as grpcCredentials,
  Metadata,
  status,
  type CallOptions as GrpcCallOptions,
  type ChannelCredentials,
  type ChannelOptions,
} from "@grpc/grpc-js";

import { DeadlineExceeded, fromGrpcError, FreshdError } from "./errors";
import * as pb from "./gen/freshd/v1/coordinator";
import {
  changeToPb,
  checkBatchFromPb,
  checkFromPb,
  checkItemToPb,
  fillFromPb,
  keyInfoFromPb,
  leaseFromPb,
  namespacePolicyFromPb,
  policyToPb,
  publishFromPb,
  purgeFromPb,
  statsFromPb,
  u64,
  type Change,
  type CheckBatchResult,
  type CheckItem,
  type CheckResult,
  type FillResult,
  type KeyInfo,
  type LeaseResult,
  type NamespacePolicy,
  type Policy,
  type PublishResult,
  type PurgeResult,
  type Stats,
} from "./types";
import { WatchStream, type WatchOptions } from "./watch";

/** PEM given as its content (a `Buffer`, or a string starting with `-----BEGIN`) or as a file path. */
export type Pem = Buffer | Uint8Array | string;

/** How to reach a freshd server: timeouts, a token, TLS. */
export interface ClientOptions {
  /**
   * Sent with publishes, fills, checks, purges and Watch streams that do not
   * name one, for no-loop and the freshness metrics. Default: empty.
   */
  clientId?: string;
  /** Bounds every unary call, in ms; `null`: no bound. Default 10,000. */
  timeoutMs?: number | null;
  /**
   * A bearer token, sent as `authorization: Bearer <token>` with every call
   * and Watch stream (`freshd --new-token` makes one).
   */
  token?: string;
  /** Use TLS with the system's roots (implied by the settings below and by `https://`). */
  tls?: boolean;
  /** The CA certificates the server's certificate must chain to (default: the system's roots). */
  rootCertificates?: Pem;
  /** A client certificate, for mutual TLS; goes with `privateKey`. */
  certificateChain?: Pem;
  /** The client certificate's key, for mutual TLS. */
  privateKey?: Pem;
  /** The name the server's certificate must carry, when it is not the address's host. */
  serverName?: string;
  /** Channel credentials for full control (exclusive with the TLS settings above). */
  credentials?: ChannelCredentials;
  /** Extra `@grpc/grpc-js` channel options; they win over this client's. */
  channelOptions?: ChannelOptions;
}

/** Per-call settings, accepted by every method. */
export interface CallOptions {
  /** Bounds this call, in ms (`null`: no bound); default: the client's `timeoutMs`. */
  timeoutMs?: number | null;
  /** An absolute deadline (a `Date` or Unix ms); wins over `timeoutMs`. */
  deadline?: Date | number;
  /** Cancels the call when aborted: the promise rejects with the signal's reason. */
  signal?: AbortSignal;
}

/** Options of {@link Client.publish}. */
export interface PublishOptions extends CallOptions {
  /** Who publishes: Watch streams of this id with `noLoop` get no notice of it. */
  clientId?: string;
}

/** Options of {@link Client.fill}. */
export interface FillOptions extends CallOptions {
  /** How long the registration lives; 0: the server's `default_ttl`. */
  ttlMs?: number;
  /** A seq got before reading the origin; a change after it refuses the fill (ABORTED). */
  observedSeq?: number;
  /** The epoch `observedSeq` came from; 0 skips the comparison. */
  epoch?: number;
  /** The token of a lease from {@link Client.lease}. */
  leaseToken?: bigint | number;
  /** The client's id, as on its Watch stream. */
  clientId?: string;
}

/** Options of {@link Client.check}. */
export interface CheckOptions extends CallOptions {
  /** How old the cached copy is, in ms. */
  ageMs?: number;
  /** The epoch the version came from; 0 skips the comparison. */
  epoch?: number;
  /** Read your writes: wait until the server applied this seq. */
  minSeq?: number;
  /** The API endpoint serving the copy (for the hit-age metric). */
  endpoint?: string;
  /** Whether the copy was already served before this check. */
  served?: boolean;
  /** The client's id, as on its Watch stream. */
  clientId?: string;
}

/** Options of {@link Client.checkBatch}. */
export interface CheckBatchOptions extends CallOptions {
  /** The epoch the versions came from; 0 skips the comparison. */
  epoch?: number;
  /** Read your writes: wait until the server applied this seq. */
  minSeq?: number;
  /** The API endpoint serving the copies. */
  endpoint?: string;
  /** The client's id, as on its Watch stream. */
  clientId?: string;
}

/** Options of {@link Client.lease}. */
export interface LeaseOptions extends CallOptions {
  /** Read your writes: wait until the server applied this seq. */
  minSeq?: number;
}

/** Options of {@link Client.purge}. */
export interface PurgeOptions extends CallOptions {
  /** Only report what the purge would do. */
  dryRun?: boolean;
  /** Copies answer REFETCH at once, and notices go out. Default: soft. */
  hard?: boolean;
  /** Go ahead although more than `max_purge_keys` keys are affected. */
  confirm?: boolean;
  /** A soft purge's spread, ms; 0: the server's `purge_jitter`. */
  jitterMs?: number;
  /** Who purges (no-loop). */
  clientId?: string;
}

interface UnaryDefinition<Req, Res> {
  readonly path: string;
  readonly requestSerialize: (value: Req) => Buffer;
  readonly responseDeserialize: (value: Buffer) => Res;
}

// Reconnect quickly after a server restart: the defaults wait up to minutes.
const CHANNEL_OPTIONS: ChannelOptions = {
  "grpc.initial_reconnect_backoff_ms": 100,
  "grpc.max_reconnect_backoff_ms": 2000,
  "grpc.keepalive_time_ms": 30_000,
  "grpc.keepalive_timeout_ms": 10_000,
};

function normaliseTarget(target: string): string {
  for (const scheme of ["http://", "grpc://", "https://"]) {
    if (target.startsWith(scheme)) {
      return target.slice(scheme.length).replace(/\/+$/, "");
    }
  }
  return target;
}

function readPem(value: Pem | undefined, what: string): Buffer | null {
  if (value === undefined) {
    return null;
  }
  let pem: Buffer;
  if (typeof value !== "string") {
    pem = Buffer.from(value);
  } else if (value.trimStart().startsWith("-----BEGIN")) {
    pem = Buffer.from(value);
  } else {
    try {
      pem = readFileSync(value);
    } catch (e) {
      const reason = e instanceof Error ? e.message : String(e);
      throw new TypeError(`${what}: cannot read ${value}: ${reason}`);
    }
  }
  if (!pem.includes("-----BEGIN")) {
    throw new TypeError(`${what}: holds no PEM block`);
  }
  return pem;
}

function bearer(token: string): string {
  const t = token.trim();
  if (t === "") {
    throw new TypeError("token: the token is empty");
  }
  for (const c of t) {
    const code = c.codePointAt(0) ?? 0;
    if (code < 33 || code > 126) {
      throw new TypeError(
        "token: the token must be visible ASCII without spaces (as `freshd --new-token` prints it)",
      );
    }
  }
  return `Bearer ${t}`;
}

/**
 * A connection to one freshd server.
 *
 * `target` is `host:port` (`http://host:port` too; `https://host:port`
 * means TLS). Every method returns a Promise and rejects with a
 * {@link FreshdError} subclass carrying the gRPC status code.
 *
 * ```ts
 * const client = new Client("127.0.0.1:50051", { token: process.env.FRESHD_TOKEN });
 * const { seq } = await client.publish(["posts:author:77"]);
 * client.close();
 * ```
 */
export class Client {
  /** The address connected to (`host:port`). */
  readonly target: string;
  /** The default client id of publishes, fills, checks, purges and Watch streams. */
  readonly clientId: string;
  /** The default bound of unary calls, ms (`null`: none). */
  readonly timeoutMs: number | null;
  /** Whether the connection uses TLS. */
  readonly tls: boolean;
  /** The generated `@grpc/grpc-js` stub, for full control. */
  readonly stub: pb.CoordinatorClient;

  private readonly authorization: string | undefined;
  private closed = false;

  /** Connects (lazily) to `target`; throws a `TypeError` on unusable settings. */
  constructor(target: string, options: ClientOptions = {}) {
    this.target = normaliseTarget(target);
    this.clientId = options.clientId ?? "";
    this.timeoutMs = options.timeoutMs === undefined ? 10_000 : options.timeoutMs;
    if ((options.certificateChain === undefined) !== (options.privateKey === undefined)) {
      throw new TypeError("certificateChain and privateKey go together: give both or neither");
    }
    const tlsSettings = [
      options.rootCertificates,
      options.certificateChain,
      options.privateKey,
      options.serverName,
    ];
    const useTls =
      options.tls === true ||
      target.startsWith("https://") ||
      tlsSettings.some((v) => v !== undefined);
    if ((target.startsWith("http://") || target.startsWith("grpc://")) && useTls) {
      throw new TypeError(
        `TLS settings are given for ${target}, a plaintext target: write https:// or host:port`,
      );
    }
    if (useTls && options.credentials !== undefined) {
      throw new TypeError("give either TLS settings or credentials, not both");
    }
    this.authorization = options.token === undefined ? undefined : bearer(options.token);
    const channelOptions: ChannelOptions = { ...CHANNEL_OPTIONS };
    if (options.serverName !== undefined) {
      channelOptions["grpc.ssl_target_name_override"] = options.serverName;
      channelOptions["grpc.default_authority"] = options.serverName;
    }
    Object.assign(channelOptions, options.channelOptions ?? {});
    let creds = options.credentials;
    if (useTls) {
      creds = grpcCredentials.createSsl(
        readPem(options.rootCertificates, "rootCertificates"),
        readPem(options.privateKey, "privateKey"),
        readPem(options.certificateChain, "certificateChain"),
      );
    }
    this.tls = useTls || (creds !== undefined && creds._isSecure());
    this.stub = new pb.CoordinatorClient(
      this.target,
      creds ?? grpcCredentials.createInsecure(),
      channelOptions,
    );
  }

  // ------------------------------------------------------------ lifecycle

  /** Closes the channel; calls in flight fail. */
  close(): void {
    if (!this.closed) {
      this.closed = true;
      this.stub.close();
    }
  }

  /** Waits until the channel is connected; rejects with {@link DeadlineExceeded} otherwise. */
  waitReady(timeoutMs = 5000): Promise<void> {
    return new Promise((resolve, reject) => {
      this.stub.waitForReady(Date.now() + timeoutMs, (error) => {
        if (error) {
          reject(
            new DeadlineExceeded(
              status.DEADLINE_EXCEEDED,
              `no connection to ${this.target} within ${timeoutMs} ms: ${error.message}`,
            ),
          );
        } else {
          resolve();
        }
      });
    });
  }

  /** The metadata of every call: the bearer token, when there is one. */
  private metadata(): Metadata {
    const metadata = new Metadata();
    if (this.authorization !== undefined) {
      metadata.set("authorization", this.authorization);
    }
    return metadata;
  }

  private callOptions(options: CallOptions): Partial<GrpcCallOptions> {
    if (options.deadline !== undefined) {
      return { deadline: options.deadline };
    }
    const timeoutMs = options.timeoutMs === undefined ? this.timeoutMs : options.timeoutMs;
    return timeoutMs === null ? {} : { deadline: Date.now() + timeoutMs };
  }

  private unary<Req, Res>(
    definition: UnaryDefinition<Req, Res>,
    method: string,
    request: Req,
    options: CallOptions = {},
  ): Promise<Res> {
    const signal = options.signal;
    if (signal?.aborted) {
      return Promise.reject(signal.reason);
    }
    return new Promise<Res>((resolve, reject) => {
      let onAbort: (() => void) | undefined;
      const call = this.stub.makeUnaryRequest<Req, Res>(
        definition.path,
        definition.requestSerialize,
        definition.responseDeserialize,
        request,
        this.metadata(),
        this.callOptions(options),
        (error, response) => {
          if (onAbort !== undefined) {
            signal?.removeEventListener("abort", onAbort);
          }
          if (error) {
            reject(signal?.aborted ? signal.reason : fromGrpcError(error, method));
          } else if (response === undefined) {
            reject(fromGrpcError(new Error("no response"), method));
          } else {
            resolve(response);
          }
        },
      );
      if (signal !== undefined) {
        onAbort = () => call.cancel();
        signal.addEventListener("abort", onAbort, { once: true });
      }
    });
  }

  // ----------------------------------------------------------------- RPCs

  /**
   * Publishes changes: each key and every transitive dependent is bumped
   * once. A plain string is a change of that key.
   * Rejects with {@link InvalidArgument} on empty `changes` or a bad key.
   */
  async publish(
    changes: Iterable<Change | string>,
    options: PublishOptions = {},
  ): Promise<PublishResult> {
    const request: pb.PublishRequest = {
      changes: [...changes].map(changeToPb),
      clientId: options.clientId ?? this.clientId,
    };
    return publishFromPb(
      await this.unary(pb.CoordinatorService.publish, "Publish", request, options),
    );
  }

  /**
   * Registers a cached key with its dependencies. Rejects with
   * {@link FillRaced} (ABORTED) when the key or a dependency changed after
   * `observedSeq` (or the lease's seq), with {@link LeaseLost} for a lease
   * token the caller does not hold.
   */
  async fill(
    key: string,
    dependencies: Iterable<string> = [],
    options: FillOptions = {},
  ): Promise<FillResult> {
    const request: pb.FillRequest = {
      key,
      dependencies: [...dependencies],
      ttlMs: u64(options.ttlMs, "ttlMs"),
      observedSeq: u64(options.observedSeq, "observedSeq"),
      epoch: u64(options.epoch, "epoch"),
      leaseToken: u64(options.leaseToken, "leaseToken"),
      clientId: options.clientId ?? this.clientId,
    };
    return fillFromPb(await this.unary(pb.CoordinatorService.fill, "Fill", request, options));
  }

  /** Is a cached copy at `version` still right? The fact and the policy's decision. */
  async check(key: string, version = 0, options: CheckOptions = {}): Promise<CheckResult> {
    const request: pb.CheckRequest = {
      key,
      version: u64(version, "version"),
      ageMs: u64(options.ageMs, "ageMs"),
      epoch: u64(options.epoch, "epoch"),
      minSeq: u64(options.minSeq, "minSeq"),
      endpoint: options.endpoint ?? "",
      served: options.served ?? false,
      clientId: options.clientId ?? this.clientId,
    };
    return checkFromPb(await this.unary(pb.CoordinatorService.check, "Check", request, options));
  }

  /**
   * Checks many copies, answered from one consistent state. An item is a
   * {@link CheckItem} or a `[key, version]` pair.
   */
  async checkBatch(
    items: Iterable<CheckItem | readonly [string, number]>,
    options: CheckBatchOptions = {},
  ): Promise<CheckBatchResult> {
    const request: pb.CheckBatchRequest = {
      items: [...items].map(checkItemToPb),
      epoch: u64(options.epoch, "epoch"),
      minSeq: u64(options.minSeq, "minSeq"),
      endpoint: options.endpoint ?? "",
      clientId: options.clientId ?? this.clientId,
    };
    return checkBatchFromPb(
      await this.unary(pb.CoordinatorService.checkBatch, "CheckBatch", request, options),
    );
  }

  /** Everything freshd holds for one key; rejects with {@link NotFound} when it holds nothing. */
  async inspect(key: string, options: CallOptions = {}): Promise<KeyInfo> {
    return keyInfoFromPb(
      await this.unary(pb.CoordinatorService.inspect, "Inspect", { key }, options),
    );
  }

  /** Server-wide counters. */
  async stats(options: CallOptions = {}): Promise<Stats> {
    return statsFromPb(await this.unary(pb.CoordinatorService.stats, "Stats", {}, options));
  }

  /** Asks for the fill lease of a key before reading the origin on a miss. */
  async lease(key: string, options: LeaseOptions = {}): Promise<LeaseResult> {
    const request: pb.LeaseRequest = { key, minSeq: u64(options.minSeq, "minSeq") };
    return leaseFromPb(await this.unary(pb.CoordinatorService.lease, "Lease", request, options));
  }

  /**
   * Invalidates every key under a prefix, and their dependents (soft by
   * default). Rejects with {@link FailedPrecondition} over `max_purge_keys`
   * without `confirm`, {@link ResourceExhausted} over `purges_per_minute`.
   */
  async purge(prefix: string, options: PurgeOptions = {}): Promise<PurgeResult> {
    const request: pb.PurgeRequest = {
      prefix,
      dryRun: options.dryRun ?? false,
      hard: options.hard ?? false,
      confirm: options.confirm ?? false,
      jitterMs: u64(options.jitterMs, "jitterMs"),
      clientId: options.clientId ?? this.clientId,
    };
    return purgeFromPb(await this.unary(pb.CoordinatorService.purge, "Purge", request, options));
  }

  /** The policy in force for a namespace (the empty one is the default). */
  async getPolicy(namespace = "", options: CallOptions = {}): Promise<NamespacePolicy> {
    return namespacePolicyFromPb(
      await this.unary(pb.CoordinatorService.getPolicy, "GetPolicy", { namespace }, options),
    );
  }

  /** Sets a namespace's policy (the empty namespace: the default); unset fields are 0. */
  async setPolicy(
    namespace: string,
    policy: Partial<Policy>,
    options: CallOptions = {},
  ): Promise<NamespacePolicy> {
    const request: pb.SetPolicyRequest = { namespace, policy: policyToPb(policy) };
    return namespacePolicyFromPb(
      await this.unary(pb.CoordinatorService.setPolicy, "SetPolicy", request, options),
    );
  }

  /** Every policy: the default first, then namespaces in order. */
  async listPolicies(options: CallOptions = {}): Promise<NamespacePolicy[]> {
    const response = await this.unary(
      pb.CoordinatorService.listPolicies,
      "ListPolicies",
      {},
      options,
    );
    return response.policies.map(namespacePolicyFromPb);
  }

  /**
   * Removes a namespace's policy; it falls back to the default. Rejects with
   * {@link NotFound} when it has none.
   */
  async deletePolicy(namespace: string, options: CallOptions = {}): Promise<void> {
    await this.unary(pb.CoordinatorService.deletePolicy, "DeletePolicy", { namespace }, options);
  }

  // ---------------------------------------------------------------- Watch

  /**
   * Opens the invalidation stream without waiting: requests can be sent at
   * once, {@link WatchStream.started} resolves with the `started` message.
   */
  openWatch(options: WatchOptions = {}): WatchStream {
    if (this.closed) {
      throw new FreshdError(status.CANCELLED, "the client is closed", "Watch");
    }
    const start: pb.WatchStart = {
      clientId: options.clientId ?? this.clientId,
      noLoop: options.noLoop ?? false,
      resume:
        options.resume === undefined
          ? undefined
          : {
              epoch: u64(options.resume.epoch, "resume.epoch"),
              seq: u64(options.resume.seq, "resume.seq"),
            },
      track: [...(options.track ?? [])],
      subscribe: [...(options.subscribe ?? [])],
      refusalsInBand: options.refusalsInBand ?? false,
    };
    const call = this.stub.watch(this.metadata(), {});
    return new WatchStream(call, start, options);
  }

  /**
   * Opens the invalidation stream and waits for its `started` message.
   * Rejects with the server's refusal (a bad key, a limit, a scope) or with
   * {@link DeadlineExceeded} after `startTimeoutMs`.
   */
  async watch(options: WatchOptions = {}): Promise<WatchStream> {
    const stream = this.openWatch(options);
    const timeoutMs = options.startTimeoutMs ?? this.timeoutMs;
    let timer: NodeJS.Timeout | undefined;
    try {
      if (timeoutMs === null) {
        await stream.started;
      } else {
        const timeout = new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(
                new DeadlineExceeded(
                  status.DEADLINE_EXCEEDED,
                  `no \`started\` within ${timeoutMs} ms`,
                  "Watch",
                ),
              ),
            timeoutMs,
          );
        });
        await Promise.race([stream.started, timeout]);
      }
    } catch (e) {
      stream.cancel();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    return stream;
  }
}
