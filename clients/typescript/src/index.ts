/**
 * `@freshd/client`: the TypeScript client of freshd, the cache-coordination
 * server. {@link Client} has one method per RPC of `freshd.v1.Coordinator`;
 * {@link WatchStream} is the invalidation stream; {@link NearCache} is an
 * in-process cache whose copies freshd keeps right.
 *
 * @packageDocumentation
 */
export {
  Client,
  type CallOptions,
  type CheckBatchOptions,
  type CheckOptions,
  type ClientOptions,
  type FillOptions,
  type LeaseOptions,
  type Pem,
  type PublishOptions,
  type PurgeOptions,
} from "./client";
export {
  Cancelled,
  DeadlineExceeded,
  FailedPrecondition,
  FillRaced,
  FreshdError,
  InternalError,
  InvalidArgument,
  LeaseLost,
  NotFound,
  OutOfRange,
  PermissionDenied,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
  statusName,
  type StatusCodeName,
} from "./errors";
export {
  NearCache,
  namespaceOf,
  type Loaded,
  type Loader,
  type NearCacheOptions,
  type NearCacheStats,
} from "./nearcache";
export type {
  Change,
  ChangeResult,
  CheckBatchResult,
  CheckItem,
  CheckItemResult,
  CheckResult,
  Decision,
  FillResult,
  Freshness,
  KeyInfo,
  LeaseResult,
  NamespacePolicy,
  Notice,
  NoticeBatch,
  Policy,
  Progress,
  PublishResult,
  PurgeResult,
  Refused,
  Reset,
  ResetReason,
  ResumeOutcome,
  ResumeToken,
  Stats,
  SubscriberStats,
  WatchEvent,
  WatchStarted,
} from "./types";
export {
  DEFAULT_MAX_BUFFERED,
  StreamEnded,
  WatchStream,
  WatchTimeout,
  type SyncResult,
  type WatchOptions,
} from "./watch";
/** The gRPC status codes (`status.ABORTED`, ...), as `FreshdError.code` holds them. */
export { status } from "@grpc/grpc-js";
