/**
 * Watch streams: the invalidation stream of `freshd.v1.Coordinator`, as an
 * async iterable of {@link WatchEvent}s with methods to send requests.
 *
 * @module
 */
import { status, type ClientDuplexStream } from "@grpc/grpc-js";

import { errorFor, FreshdError, fromGrpcError } from "./errors";
import type * as pb from "./gen/freshd/v1/coordinator";
import {
  u64,
  watchEventFromPb,
  type Notice,
  type Progress,
  type Refused,
  type Reset,
  type ResumeToken,
  type WatchEvent,
  type WatchStarted,
} from "./types";

/** Events a {@link WatchStream} holds before it stops reading from the server. */
export const DEFAULT_MAX_BUFFERED = 1024;

/** What opens a Watch stream: the `WatchStart` fields and local settings. */
export interface WatchOptions {
  /** Names the client, for `noLoop` and for Stats (default: the client's). */
  clientId?: string;
  /** Send no notice caused by a publish with this client id. */
  noLoop?: boolean;
  /** Resume after a disconnect from this token. Unset: start from now. */
  resume?: ResumeToken;
  /** Exact keys to track from the start. */
  track?: Iterable<string>;
  /** Prefixes to watch from the start. */
  subscribe?: Iterable<string>;
  /**
   * Answer a later refused `track` or `subscribe` with a {@link Refused}
   * event, and go on; unset, such a request ends the stream with the error.
   */
  refusalsInBand?: boolean;
  /**
   * Events read from the server and not yet taken: past it, the stream stops
   * reading and the server treats it as a slow consumer. Default 1,024.
   */
  maxBuffered?: number;
  /** How long {@link Client.watch} waits for `started`, in ms (default: the client's timeout). */
  startTimeoutMs?: number;
  /** Cancels the stream when aborted. */
  signal?: AbortSignal;
}

/** The stream ended without an error (the client closed or cancelled it). */
export class StreamEnded extends Error {
  /** An end, with a message. */
  constructor(message = "the Watch stream ended") {
    super(message);
    this.name = "StreamEnded";
  }
}

/** No Watch event arrived within the time asked for. */
export class WatchTimeout extends Error {
  /** A timeout, with a message. */
  constructor(message: string) {
    super(message);
    this.name = "WatchTimeout";
  }
}

/** What {@link WatchStream.sync} collected up to the progress watermark. */
export interface SyncResult {
  /** Notices, in arrival order. */
  notices: Notice[];
  /** Resets, in arrival order. */
  resets: Reset[];
  /** Refused requests (streams with `refusalsInBand` only). */
  refused: Refused[];
  /** The watermark. */
  progress: Progress;
}

interface Waiter {
  resolve: (event: WatchEvent) => void;
  reject: (error: Error) => void;
}

type Call = ClientDuplexStream<pb.WatchRequest, pb.WatchResponse>;

/**
 * One Watch stream. Send filter changes, acknowledgements and progress
 * requests with its methods; read notice batches, progress, resets and
 * refusals with `for await`, {@link WatchStream.next} or
 * {@link WatchStream.sync}. The first event, `started`, resolves
 * {@link WatchStream.started} instead.
 *
 * At most `maxBuffered` events wait to be taken: past that the stream stops
 * reading, its flow-control windows fill and the server treats it as a slow
 * consumer (it catches the stream up from its history, or resets), rather
 * than this process buffering without bound.
 */
export class WatchStream implements AsyncIterable<WatchEvent> {
  /** Resolves with the `started` message; rejects if the server refused the start. */
  readonly started: Promise<WatchStarted>;
  /**
   * Resolves once the call is over: with `undefined` when it ended cleanly
   * (or was cancelled here), with the error otherwise. Never rejects.
   */
  readonly ended: Promise<FreshdError | undefined>;

  private readonly call: Call;
  private readonly maxBuffered: number;
  private readonly buffer: WatchEvent[] = [];
  private waiter: Waiter | undefined;
  private finished = false;
  private failure: FreshdError | undefined;
  private halfClosed = false;
  private cancelled = false;
  private paused = false;
  private sent = 1;
  private token: ResumeToken | undefined;
  private resumeFrom: { epoch: number; seq: number } | undefined;
  private settleStarted!: (started: WatchStarted) => void;
  private failStarted!: (error: Error) => void;
  private settleEnded!: (error: FreshdError | undefined) => void;
  private gotStarted = false;

  /** @internal Use {@link Client.watch} or {@link Client.openWatch}. */
  constructor(call: Call, start: pb.WatchStart, options: WatchOptions = {}) {
    const maxBuffered = options.maxBuffered ?? DEFAULT_MAX_BUFFERED;
    if (!Number.isInteger(maxBuffered) || maxBuffered < 1) {
      throw new RangeError(`maxBuffered must be a positive integer, got ${maxBuffered}`);
    }
    this.maxBuffered = maxBuffered;
    this.call = call;
    this.resumeFrom =
      start.resume === undefined
        ? undefined
        : { epoch: Number(start.resume.epoch), seq: Number(start.resume.seq) };
    this.started = new Promise<WatchStarted>((resolve, reject) => {
      this.settleStarted = resolve;
      this.failStarted = reject;
    });
    // Handled here so that a refused start is no unhandled rejection when
    // the caller reads the stream's events instead of `started`.
    this.started.catch(() => undefined);
    this.ended = new Promise((resolve) => {
      this.settleEnded = resolve;
    });

    call.on("data", (response: pb.WatchResponse) => this.onData(response));
    call.on("error", (error: unknown) => this.onError(error));
    call.on("end", () => this.finish(undefined));
    call.write({ request: { $case: "start", value: start } });

    const signal = options.signal;
    if (signal !== undefined) {
      if (signal.aborted) {
        this.cancel();
      } else {
        const onAbort = (): void => this.cancel();
        signal.addEventListener("abort", onAbort, { once: true });
        void this.ended.then(() => signal.removeEventListener("abort", onAbort));
      }
    }
  }

  // ------------------------------------------------------------- reading

  private onData(response: pb.WatchResponse): void {
    const event = watchEventFromPb(response);
    if (event === undefined) {
      return;
    }
    if (event.type === "started" && !this.gotStarted) {
      this.gotStarted = true;
      // Resumed inside the same epoch: missed notices follow, so the token
      // stays where the resume started until they arrive.
      const resume = this.resumeFrom;
      this.token =
        resume !== undefined && resume.epoch === event.epoch && event.outcome !== "NEW"
          ? { epoch: resume.epoch, seq: resume.seq }
          : { epoch: event.epoch, seq: event.seq };
      this.settleStarted(event);
      return;
    }
    if (this.waiter !== undefined && this.buffer.length === 0) {
      const waiter = this.waiter;
      this.waiter = undefined;
      this.delivered(event);
      waiter.resolve(event);
      return;
    }
    this.buffer.push(event);
    if (this.buffer.length >= this.maxBuffered && !this.paused && !this.finished) {
      this.paused = true;
      this.call.pause();
    }
  }

  private onError(error: unknown): void {
    if (this.finished) {
      return;
    }
    // Take what the stream still holds before the error.
    let chunk: pb.WatchResponse | null;
    while ((chunk = this.call.read() as pb.WatchResponse | null) !== null) {
      const event = watchEventFromPb(chunk);
      if (event !== undefined) {
        this.buffer.push(event);
      }
    }
    const failure = fromGrpcError(error, "Watch");
    this.finish(this.cancelled && failure.code === status.CANCELLED ? undefined : failure);
  }

  private finish(failure: FreshdError | undefined): void {
    if (this.finished) {
      return;
    }
    this.finished = true;
    this.failure = failure;
    if (!this.gotStarted) {
      this.failStarted(
        failure ?? errorFor(status.UNKNOWN, "the stream ended before `started`", "Watch"),
      );
    }
    if (this.waiter !== undefined) {
      const waiter = this.waiter;
      this.waiter = undefined;
      waiter.reject(this.endError());
    }
    this.settleEnded(failure);
  }

  private endError(): Error {
    return this.failure ?? new StreamEnded();
  }

  private delivered(event: WatchEvent): void {
    if (event.type === "progress") {
      this.token = { epoch: event.epoch, seq: event.seq };
    } else if (event.type === "notices" && event.notices.length > 0 && this.token !== undefined) {
      this.token = { epoch: this.token.epoch, seq: event.notices[event.notices.length - 1]!.seq };
    }
  }

  /**
   * Where the stream stands: the last progress or notice taken from it
   * (`started` before any). Resume a new stream with it after a disconnect.
   */
  get resumeToken(): ResumeToken | undefined {
    return this.token === undefined ? undefined : { ...this.token };
  }

  /** Events read from the server and not yet taken. */
  get buffered(): number {
    return this.buffer.length;
  }

  /** Whether the call is over. */
  get isEnded(): boolean {
    return this.finished;
  }

  /**
   * The next event. Rejects with {@link WatchTimeout} after `timeoutMs`, with
   * the {@link FreshdError} the stream failed with, or with
   * {@link StreamEnded} once it ended. One caller at a time.
   */
  next(timeoutMs?: number): Promise<WatchEvent> {
    const event = this.buffer.shift();
    if (event !== undefined) {
      if (this.paused && this.buffer.length < this.maxBuffered) {
        this.paused = false;
        this.call.resume();
      }
      this.delivered(event);
      return Promise.resolve(event);
    }
    if (this.finished) {
      return Promise.reject(this.endError());
    }
    if (this.waiter !== undefined) {
      return Promise.reject(new Error("another caller is already waiting for the next event"));
    }
    return new Promise<WatchEvent>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const waiter: Waiter = {
        resolve: (e) => {
          if (timer !== undefined) clearTimeout(timer);
          resolve(e);
        },
        reject: (e) => {
          if (timer !== undefined) clearTimeout(timer);
          reject(e);
        },
      };
      if (timeoutMs !== undefined) {
        timer = setTimeout(() => {
          if (this.waiter === waiter) {
            this.waiter = undefined;
          }
          reject(new WatchTimeout(`no Watch event within ${timeoutMs} ms`));
        }, timeoutMs);
      }
      this.waiter = waiter;
    });
  }

  /** Yields every event until the stream ends; throws if it fails. */
  async *[Symbol.asyncIterator](): AsyncIterator<WatchEvent> {
    for (;;) {
      let event: WatchEvent;
      try {
        event = await this.next();
      } catch (e) {
        if (e instanceof StreamEnded) {
          return;
        }
        throw e;
      }
      yield event;
    }
  }

  /**
   * Requests progress and collects every notice, reset and refusal up to it.
   * Rejects with {@link WatchTimeout} when nothing arrives for `timeoutMs`.
   */
  async sync(timeoutMs = 10_000): Promise<SyncResult> {
    this.requestProgress();
    const result: Omit<SyncResult, "progress"> = { notices: [], resets: [], refused: [] };
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const event = await this.next(Math.max(0, deadline - Date.now()));
      switch (event.type) {
        case "notices":
          result.notices.push(...event.notices);
          break;
        case "reset":
          result.resets.push(event);
          break;
        case "refused":
          result.refused.push(event);
          break;
        case "progress":
          return { ...result, progress: event };
        default:
          break;
      }
    }
  }

  // --------------------------------------------------------------- sends
  // Each returns the request's number on the stream (the start was 1): the
  // number a `Refused` event names.

  private send(request: pb.WatchRequest["request"]): number {
    if (this.finished || this.halfClosed) {
      throw new StreamEnded("the Watch stream is closed");
    }
    this.call.write({ request });
    this.sent += 1;
    return this.sent;
  }

  /** Tracks exact keys (before reading them from the origin). */
  track(keys: Iterable<string>): number {
    return this.send({ $case: "track", value: { keys: [...keys] } });
  }

  /** Stops tracking keys. */
  untrack(keys: Iterable<string>): number {
    return this.send({ $case: "untrack", value: { keys: [...keys] } });
  }

  /** Watches prefixes (every notice under them; "" is every key). */
  subscribe(prefixes: Iterable<string>): number {
    return this.send({ $case: "subscribe", value: { keys: [...prefixes] } });
  }

  /** Stops watching prefixes. */
  unsubscribe(prefixes: Iterable<string>): number {
    return this.send({ $case: "unsubscribe", value: { keys: [...prefixes] } });
  }

  /** Acknowledges every notice up to `seq` as applied. */
  ack(seq: number): number {
    return this.send({ $case: "ack", value: { seq: u64(seq, "seq") } });
  }

  /** Asks for a watermark: what is queued, then a {@link Progress} event. */
  requestProgress(): number {
    return this.send({ $case: "progress", value: {} });
  }

  // ------------------------------------------------------------- closing

  /** Closes the client side: the server then ends the stream. */
  close(): void {
    if (!this.halfClosed && !this.finished) {
      this.halfClosed = true;
      this.call.end();
    }
  }

  /** Cancels the call at once; the stream ends without an error. */
  cancel(): void {
    if (!this.finished) {
      this.cancelled = true;
      this.halfClosed = true;
      this.call.cancel();
    }
  }

  /**
   * Waits until the call is over, at most `timeoutMs`: true if it is.
   */
  async waitEnded(timeoutMs?: number): Promise<boolean> {
    if (this.finished) {
      return true;
    }
    if (timeoutMs === undefined) {
      await this.ended;
      return true;
    }
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((resolve) => {
      timer = setTimeout(() => resolve(false), timeoutMs);
    });
    try {
      return await Promise.race([this.ended.then(() => true as const), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}
