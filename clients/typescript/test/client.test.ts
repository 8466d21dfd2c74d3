/** The typed API against real servers: results, errors, deadlines, Watch streams. */
import assert from "node:assert/strict";
import { afterEach, beforeEach, test } from "node:test";

import {
  Cancelled,
  Client,
  DeadlineExceeded,
  FailedPrecondition,
  FillRaced,
  FreshdError,
  InvalidArgument,
  LeaseLost,
  NotFound,
  StreamEnded,
  Unavailable,
  status,
  type WatchEvent,
} from "../src/index";
import { Servers, freshdBinary, waitUntil } from "./harness";

let servers: Servers;
let clients: Client[];

beforeEach(() => {
  servers = new Servers();
  clients = [];
});

afterEach(async () => {
  for (const c of clients) c.close();
  await servers.killAll();
});

async function connect(settings: Record<string, unknown> = {}): Promise<Client> {
  const server = await servers.start(settings);
  const c = new Client(server.addr, { timeoutMs: 5000 });
  clients.push(c);
  return c;
}

test("publish, fill, check, inspect and stats give typed results", async () => {
  const c = await connect();
  const s0 = (await c.check("feed:1")).seq;
  const fill = await c.fill("feed:1", ["posts:1"], { ttlMs: 60_000, observedSeq: s0 });
  assert.equal(fill.ttlMs, 60_000);
  const fresh = await c.check("feed:1", fill.version, { epoch: fill.epoch });
  assert.equal(fresh.freshness, "FRESH");
  assert.equal(fresh.decision, "FRESH");
  assert.equal(fresh.checkSampleRate, 1);
  const published = await c.publish([{ key: "posts:1", externalVersion: 5 }, "other:1"]);
  assert.equal(published.results.length, 2);
  assert.equal(published.results[0]?.invalidated, 2);
  const stale = await c.check("feed:1", fill.version);
  assert.deepEqual([stale.freshness, stale.version], ["STALE", published.seq]);
  const batch = await c.checkBatch([
    ["feed:1", fill.version],
    { key: "feed:1", version: published.seq },
  ]);
  assert.deepEqual(
    batch.results.map((r) => r.freshness),
    ["STALE", "FRESH"],
  );
  const info = await c.inspect("posts:1");
  assert.deepEqual([info.externalVersion, info.dependents, info.registered], [5, 1, false]);
  const stats = await c.stats();
  assert.equal(stats.seq, published.seq);
  assert.equal(stats.epoch, fill.epoch);
});

test("policies: set, get, list, delete", async () => {
  const c = await connect();
  const set = await c.setPolicy("feed", { maxAgeMs: 5000, checkSampleRate: 0.5 });
  assert.deepEqual(set, {
    namespace: "feed",
    isDefault: false,
    policy: {
      maxAgeMs: 5000,
      revalidateAfterMs: 0,
      staleWhileRevalidateMs: 0,
      allowStaleOnCritical: false,
      checkSampleRate: 0.5,
    },
  });
  assert.equal((await c.getPolicy("feed")).policy.maxAgeMs, 5000);
  assert.deepEqual(
    (await c.listPolicies()).map((p) => [p.namespace, p.isDefault]),
    [
      ["", true],
      ["feed", false],
    ],
  );
  await c.deletePolicy("feed");
  assert.equal((await c.getPolicy("feed")).isDefault, true);
  await assert.rejects(c.deletePolicy("feed"), NotFound);
});

test("leases and purges", async () => {
  const c = await connect();
  const lease = await c.lease("feed:1");
  assert.ok(lease.granted);
  assert.equal(typeof lease.token, "bigint");
  const other = await c.lease("feed:1");
  assert.ok(!other.granted && other.token === 0n && other.retryAfterMs > 0);
  await c.fill("feed:1", ["posts:1"], { leaseToken: lease.token });
  await assert.rejects(c.fill("feed:1", [], { leaseToken: lease.token }), LeaseLost);
  const dry = await c.purge("feed:", { dryRun: true, hard: true });
  assert.deepEqual([dry.matched, dry.applied], [1, false]);
  const hard = await c.purge("feed:", { hard: true });
  assert.ok(hard.applied);
});

test("errors carry the status code, its name and the server's message", async () => {
  const c = await connect({ max_key_bytes: "16" });
  const bad = await c.fill("a-key-that-is-too-long").catch((e: unknown) => e);
  assert.ok(bad instanceof InvalidArgument && bad instanceof FreshdError);
  assert.equal(bad.code, status.INVALID_ARGUMENT);
  assert.equal(bad.codeName, "INVALID_ARGUMENT");
  assert.equal(bad.method, "Fill");
  assert.match(bad.details, /max_key_bytes/);
  await assert.rejects(c.inspect("nothing"), NotFound);
  await assert.rejects(c.fill("k", [], { epoch: 1 }), FillRaced);
  const lost = await c.fill("k", [], { leaseToken: 12345 }).catch((e: unknown) => e);
  assert.ok(lost instanceof LeaseLost && lost instanceof FailedPrecondition);
  await assert.rejects(c.publish([]), /changes must not be empty/);
  await assert.rejects(c.check("k", -1), RangeError);
});

test("a deadline, an abort signal and an unreachable server", async () => {
  const c = await connect({ max_wait_for_seq: "30s" });
  // min_seq far ahead: the server waits for it; the deadline ends the call.
  await assert.rejects(c.check("k", 0, { minSeq: 1e9, timeoutMs: 100 }), DeadlineExceeded);
  await assert.rejects(
    c.check("k", 0, { minSeq: 1e9, deadline: Date.now() + 100 }),
    DeadlineExceeded,
  );
  const abort = new AbortController();
  const aborted = c.check("k", 0, { minSeq: 1e9, signal: abort.signal, timeoutMs: null });
  abort.abort(new Error("no longer needed"));
  await assert.rejects(aborted, /no longer needed/);
  await assert.rejects(c.stats({ signal: AbortSignal.abort(new Error("at once")) }), /at once/);

  const server = await servers.start();
  await server.kill();
  const nowhere = new Client(server.addr, { timeoutMs: 2000 });
  clients.push(nowhere);
  await assert.rejects(
    nowhere.stats(),
    (e: unknown) => e instanceof Unavailable || e instanceof DeadlineExceeded,
  );
});

test("unusable settings are refused before connecting", () => {
  for (const bad of ["", "two words", "caf\u00e9"]) {
    assert.throws(() => new Client("127.0.0.1:1", { token: bad }), /token/);
  }
  assert.throws(
    () => new Client("http://127.0.0.1:1", { rootCertificates: "-----BEGIN CERTIFICATE-----" }),
    /https:\/\//,
  );
  assert.throws(
    () => new Client("127.0.0.1:1", { rootCertificates: "/nonexistent/ca.pem" }),
    /cannot read/,
  );
  assert.throws(() => new Client("127.0.0.1:1", { certificateChain: "-----BEGIN X-----" }), /both/);
  assert.ok(freshdBinary().length > 0);
});

test("a Watch stream: notices, progress, its resume token, iteration and close", async () => {
  const c = await connect();
  await c.fill("feed:1", ["posts:1"]);
  const stream = await c.watch({ clientId: "svc", track: ["feed:1"], subscribe: ["users:"] });
  const started = await stream.started;
  assert.equal(started.outcome, "NEW");
  assert.deepEqual(stream.resumeToken, { epoch: started.epoch, seq: started.seq });
  const p1 = await c.publish(["posts:1"]);
  await c.publish(["other:1"]);
  const synced = await stream.sync(5000);
  assert.deepEqual(
    synced.notices.map((n) => [n.key, n.seq, n.version, n.cause]),
    [["feed:1", p1.seq, p1.seq, "posts:1"]],
  );
  assert.deepEqual(stream.resumeToken, { epoch: started.epoch, seq: synced.progress.seq });
  assert.equal(stream.ack(synced.progress.seq), 3); // the start was 1, the progress request 2

  const p2 = await c.publish(["users:9"]);
  const seen: WatchEvent[] = [];
  for await (const event of stream) {
    seen.push(event);
    if (event.type === "notices") break;
  }
  assert.deepEqual(
    seen.map((e) => e.type),
    ["notices"],
  );
  assert.deepEqual(stream.resumeToken, { epoch: started.epoch, seq: p2.seq });
  assert.equal(stream.untrack(["feed:1"]), 4);

  stream.close();
  assert.ok(await stream.waitEnded(5000));
  assert.equal(await stream.ended, undefined);
  await assert.rejects(stream.next(), StreamEnded);
  assert.throws(() => stream.track(["x"]), StreamEnded);
});

test("a resumed Watch stream replays what it missed; a refused start rejects", async () => {
  const c = await connect();
  const first = await c.watch({ subscribe: ["users:"] });
  const token = (await first.sync()).progress;
  first.cancel();
  assert.equal(await first.ended, undefined);
  const missed = await c.publish(["users:1"]);
  const resumed = await c.watch({ subscribe: ["users:"], resume: token });
  assert.equal((await resumed.started).outcome, "FROM_HISTORY");
  assert.deepEqual(
    (await resumed.sync()).notices.map((n) => n.seq),
    [missed.seq],
  );
  resumed.cancel();

  await assert.rejects(c.watch({ track: [""] }), InvalidArgument);
  const opened = c.openWatch({ track: [""] });
  await assert.rejects(opened.started, InvalidArgument);
  const failure = await opened.ended;
  assert.ok(failure instanceof InvalidArgument);
});

test("a Watch stream cancelled by its signal ends without an error", async () => {
  const c = await connect();
  const abort = new AbortController();
  const stream = await c.watch({ subscribe: [""], signal: abort.signal });
  const next = stream.next();
  abort.abort();
  await assert.rejects(next, StreamEnded);
  assert.equal(await stream.ended, undefined);
  await waitUntil(async () => (await c.stats()).subscribers.length === 0, "the stream to go");
  assert.ok(new Cancelled(status.CANCELLED, "x") instanceof FreshdError);
});
