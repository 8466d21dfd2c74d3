/**
 * NearCache against real servers: misses and hits, invalidation by another
 * client, stale-while-revalidate, leases, batched checks, resume after a
 * disconnect, a repair, and a server restart (new epoch).
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import { afterEach, beforeEach, test } from "node:test";

import { Client, NearCache, type Loader, type NearCacheOptions } from "../src/index";
import { Servers, TcpProxy, waitUntil, type FreshdServer } from "./harness";

/** The source of truth the caches read, with a count of reads per key. */
class Origin {
  readonly values = new Map<string, string>();
  readonly deps = new Map<string, string[]>();
  readonly reads = new Map<string, number>();

  set(key: string, value: string, deps: string[]): void {
    this.values.set(key, value);
    this.deps.set(key, deps);
  }

  readsOf(key: string): number {
    return this.reads.get(key) ?? 0;
  }

  loader(key: string, before: () => Promise<void> | void = () => undefined): Loader<string> {
    return async () => {
      await before();
      this.reads.set(key, this.readsOf(key) + 1);
      return { value: this.values.get(key) ?? "", dependencies: [...(this.deps.get(key) ?? [])] };
    };
  }
}

/** A promise to open by hand. */
function gate(): { wait: () => Promise<void>; open: () => void } {
  let open!: () => void;
  const opened = new Promise<void>((r) => {
    open = r;
  });
  return { wait: () => opened, open };
}

let servers: Servers;
let closers: Array<() => Promise<void> | void>;
let origin: Origin;

beforeEach(() => {
  servers = new Servers();
  closers = [];
  origin = new Origin();
  origin.set("feed:1", "feed v1", ["posts:1", "follows:1"]);
});

afterEach(async () => {
  for (const close of closers.reverse()) await close();
  await servers.killAll();
});

function client(addr: string): Client {
  const c = new Client(addr, { timeoutMs: 5000 });
  closers.push(() => c.close());
  return c;
}

function cache(addr: string, options: NearCacheOptions = {}): NearCache<string> {
  const c = new NearCache<string>(client(addr), { reconnectBackoffMs: [20, 500], ...options });
  closers.push(() => c.close());
  return c;
}

async function watchingCache(
  server: FreshdServer,
  options: NearCacheOptions = {},
): Promise<NearCache<string>> {
  const c = cache(server.addr, options);
  assert.ok(await c.waitWatching(10_000), "the Watch stream did not connect");
  return c;
}

test("a miss leases, loads and fills; a hit is checked and served", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  const c = await watchingCache(server, { endpoint: "/feed" });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  assert.equal(origin.readsOf("feed:1"), 1);
  const s = c.stats;
  assert.deepEqual([s.misses, s.hits, s.checks, s.loads], [1, 1, 1, 1]);

  const held = c.versionOf("feed:1");
  assert.ok(held !== undefined);
  const info = await admin.inspect("feed:1");
  assert.ok(info.registered);
  assert.equal(info.version, held.version);
  assert.equal(held.epoch, (await admin.stats()).epoch);
  assert.deepEqual(info.dependencies, ["follows:1", "posts:1"]);
  // The Watch stream tracks what is cached, under the cache's client id.
  const subscribers = await waitUntil(
    async () => (await admin.stats()).subscribers.filter((x) => x.trackedKeys === 1),
    "the tracked key",
  );
  assert.equal(subscribers[0]?.clientId, c.clientId);
});

test("concurrent misses read the origin once", async () => {
  const server = await servers.start();
  const c = await watchingCache(server);
  const g = gate();
  const loader = origin.loader("feed:1", g.wait);
  const gets = Array.from({ length: 8 }, () => c.get("feed:1", loader));
  await waitUntil(() => c.stats.misses === 8, "eight misses");
  g.open();
  assert.deepEqual(await Promise.all(gets), Array(8).fill("feed v1"));
  assert.equal(origin.readsOf("feed:1"), 1);
});

test("two clients: one publishes, the other's copy is dropped by the notice", async () => {
  const server = await servers.start();
  const reader = await watchingCache(server);
  const writer = await watchingCache(server);
  assert.equal(await reader.get("feed:1", origin.loader("feed:1")), "feed v1");
  origin.set("feed:1", "feed v2", ["posts:1", "follows:1"]);
  const published = await writer.client.publish(["posts:1"]);
  assert.ok(published.seq > 0);
  // The notice drops the copy: no get, no check needed.
  await waitUntil(() => !reader.has("feed:1"), "the notice to drop the copy");
  const s = reader.stats;
  assert.ok(s.noticesApplied >= 1);
  assert.equal(s.invalidations, 1);
  assert.equal(await reader.get("feed:1", origin.loader("feed:1")), "feed v2");
  assert.equal(origin.readsOf("feed:1"), 2);
});

test("a change during the origin read is not cached", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  const c = await watchingCache(server);
  const writes: number[] = [];
  const plain = origin.loader("feed:1");
  const racing: Loader<string> = async () => {
    const loaded = await plain();
    if (writes.length === 0) {
      // The origin changes right after the first read.
      origin.set("feed:1", "feed v2", [...loaded.dependencies]);
      writes.push((await admin.publish(["posts:1"])).seq);
    }
    return loaded;
  };
  // The first read (v1) raced the write: its fill is refused, and the cache
  // reads again rather than keep a stale value.
  assert.equal(await c.get("feed:1", racing), "feed v2");
  assert.equal(origin.readsOf("feed:1"), 2);
  assert.equal(c.stats.fillRaces, 1);
  assert.equal(c.peek("feed:1"), "feed v2");
  assert.ok((c.versionOf("feed:1")?.version ?? 0) >= writes[0]!);
});

test("a critical change refetches at once (the check alone catches it)", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  const c = cache(server.addr, { watch: false });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  origin.set("feed:1", "feed v2", ["posts:1"]);
  await admin.publish([{ key: "posts:1", critical: true }]);
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v2");
  assert.equal(c.stats.refetches, 1);
});

test("stale-while-revalidate serves the stale copy once and replaces it in the background", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  await admin.setPolicy("feed", { staleWhileRevalidateMs: 60_000 });
  const c = cache(server.addr, { watch: false });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  origin.set("feed:1", "feed v2", ["posts:1"]);
  await admin.publish(["posts:1"]);
  // Stale, within stale_while_revalidate: served once, refreshed behind.
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  assert.deepEqual([c.stats.staleServes, c.stats.revalidations], [1, 1]);
  await waitUntil(() => c.peek("feed:1") === "feed v2", "the background refresh");
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v2");
  assert.equal(origin.readsOf("feed:1"), 2);
});

test("one background refresh per key", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  await admin.setPolicy("feed", { staleWhileRevalidateMs: 60_000 });
  const c = cache(server.addr, { watch: false });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  await admin.publish(["posts:1"]);
  const g = gate();
  const slow = origin.loader("feed:1", g.wait);
  for (let i = 0; i < 5; i++) assert.equal(await c.get("feed:1", slow), "feed v1");
  assert.equal(c.stats.revalidations, 1);
  g.open();
  await waitUntil(() => origin.readsOf("feed:1") === 2, "the refresh");
});

test("a miss waits for the other filler's lease", async () => {
  const server = await servers.start({ lease_ttl: "300ms" });
  const other = client(server.addr);
  const c = cache(server.addr, { watch: false });
  assert.ok((await other.lease("feed:1")).granted);
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  assert.ok(c.stats.leaseWaits >= 1);
  assert.equal(c.peek("feed:1"), "feed v1");
});

test("LRU eviction untracks", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  const c = await watchingCache(server, { maxEntries: 2 });
  for (const key of ["a:1", "a:2", "a:3"]) {
    assert.equal(
      await c.get(key, () => ({ value: key.toUpperCase(), dependencies: [] })),
      key.toUpperCase(),
    );
  }
  assert.equal(c.size, 2);
  assert.ok(!c.has("a:1"));
  assert.equal(c.stats.evictions, 1);
  await waitUntil(
    async () =>
      JSON.stringify((await admin.stats()).subscribers.map((s) => s.trackedKeys)) === "[2]",
    "the untrack",
  );
});

test("check_sample_rate is followed", async () => {
  const server = await servers.start();
  await client(server.addr).setPolicy("dash", { checkSampleRate: 0 });
  const c = cache(server.addr, { watch: false });
  for (let i = 0; i < 4; i++) {
    assert.equal(await c.get("dash:1", () => ({ value: "d", dependencies: [] })), "d");
  }
  const s = c.stats;
  // The first hit's check taught the rate: the next ones are not checked.
  assert.deepEqual([s.hits, s.checks, s.uncheckedHits], [3, 1, 2]);
});

test("concurrent checks go out in one batch", async () => {
  const server = await servers.start();
  const c = cache(server.addr, { watch: false });
  const keys = Array.from({ length: 10 }, (_, i) => `feed:${i}`);
  // The first get of the namespace learns its sample rate with a single check.
  for (const key of keys) {
    await c.get(key, () => ({ value: key.toUpperCase(), dependencies: [`posts:${key}`] }));
  }
  await c.get(keys[0]!, () => ({ value: "reloaded", dependencies: [] }));
  const batches: number[] = [];
  const singles: string[] = [];
  const realBatch = c.client.checkBatch.bind(c.client);
  const realCheck = c.client.check.bind(c.client);
  c.client.checkBatch = async (items, options) => {
    const list = [...items];
    batches.push(list.length);
    return realBatch(list, options);
  };
  c.client.check = async (key, version, options) => {
    singles.push(key);
    return realCheck(key, version, options);
  };
  const results = await Promise.all(
    keys.map((k) => c.get(k, () => ({ value: "reloaded", dependencies: [] }))),
  );
  assert.deepEqual(
    results,
    keys.map((k) => k.toUpperCase()),
  );
  assert.deepEqual(batches, [keys.length]);
  assert.deepEqual(singles, []);
  assert.equal(c.stats.hits, keys.length + 1);
});

test("serve before check: served at once, dropped by the check after it", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  const c = cache(server.addr, { watch: false, serveBeforeCheck: true });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  origin.set("feed:1", "feed v2", ["posts:1"]);
  await admin.publish(["posts:1"]);
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  await waitUntil(() => !c.has("feed:1"), "the check after serving");
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v2");
});

/** Cuts the cache's Watch stream and holds it down until `proxy.blocked` is cleared. */
async function disconnect(proxy: TcpProxy, c: NearCache<string>): Promise<void> {
  proxy.blocked = true;
  proxy.cut();
  await waitUntil(() => !c.watching, "the disconnect");
}

test("the Watch resumes after a disconnect without losing a notice", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  const proxy = await new TcpProxy(server.port).listen();
  closers.push(() => proxy.close());
  const c = cache(proxy.addr, { reconnectBackoffMs: [20, 200] });
  assert.ok(await c.waitWatching(10_000));
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  await disconnect(proxy, c);
  await admin.publish(["posts:1"]); // while the stream is down
  assert.ok(c.has("feed:1"));
  proxy.blocked = false;
  await waitUntil(() => !c.has("feed:1"), "the resumed stream's notice");
  const s = c.stats;
  assert.equal(s.watchConnects, 2);
  assert.ok(s.noticesApplied >= 1);
  assert.equal(s.repairs, 0);
});

test("a resume older than the history is repaired", async () => {
  const server = await servers.start({ history_notices: "1" });
  const admin = client(server.addr);
  const proxy = await new TcpProxy(server.port).listen();
  closers.push(() => proxy.close());
  const c = cache(proxy.addr, { reconnectBackoffMs: [20, 200] });
  assert.ok(await c.waitWatching(10_000));
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  await disconnect(proxy, c);
  await admin.publish(["posts:1"]);
  await admin.publish(["x:1"]);
  await admin.publish(["x:2"]); // the history now starts after posts:1
  proxy.blocked = false;
  await waitUntil(() => !c.has("feed:1"), "the repair notice");
  assert.equal(c.stats.repairs, 1);
});

test("a server restart (new epoch) drops everything and the cache keeps working", async () => {
  const server = await servers.start();
  const c = await watchingCache(server, { reconnectBackoffMs: [20, 300] });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  const firstEpoch = c.watchEpoch;
  assert.equal(firstEpoch, server.epoch);

  await server.kill();
  await waitUntil(() => !c.watching, "the stream to notice the crash");
  // freshd is down: the origin answers, uncached.
  origin.set("feed:1", "feed v2", ["posts:1"]);
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v2");
  assert.ok(c.stats.bypasses >= 1);

  await server.restart(); // same port, new epoch, nothing remembered
  assert.notEqual(server.epoch, firstEpoch);
  await waitUntil(() => c.watchEpoch === server.epoch, "the new epoch", 10_000);
  assert.equal(c.size, 0);
  assert.ok(c.stats.resets >= 1);

  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v2");
  assert.equal(c.versionOf("feed:1")?.epoch, server.epoch);
  // And the new stream tracks it: a publish drops it again.
  await client(server.addr).publish(["posts:1"]);
  await waitUntil(() => !c.has("feed:1"), "a notice from the new server");
});

test("a miss stops waiting for a lease that is never released", async () => {
  const server = await servers.start();
  const admin = client(server.addr);
  assert.ok((await admin.lease("feed:1")).granted); // a filler that went away
  const c = cache(server.addr, { watch: false, leaseRetries: 2, maxLeaseWaitMs: 50 });
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  assert.equal(c.stats.leaseWaits, 3);
  // Filled with a seq observed before the read: cached and checkable.
  assert.equal(await c.get("feed:1", origin.loader("feed:1")), "feed v1");
  assert.equal(origin.readsOf("feed:1"), 1);
  assert.equal(c.stats.hits, 1);
});

test("checks feed the server's freshness metrics", async () => {
  const admin = await freePort();
  const server = await servers.start({ admin_listen: `127.0.0.1:${admin}` });
  const checked = cache(server.addr, { endpoint: "/feed", watch: false });
  await checked.get("feed:1", () => ({ value: "v", dependencies: ["posts:1"] }));
  await checked.get("feed:1", () => ({ value: "v", dependencies: ["posts:1"] })); // a checked hit
  const served = cache(server.addr, { endpoint: "/feed", watch: false, serveBeforeCheck: true });
  await served.get("feed:2", () => ({ value: "v", dependencies: ["posts:2"] }));
  await served.client.publish(["posts:2"]);
  await served.get("feed:2", () => ({ value: "v", dependencies: ["posts:2"] })); // served, then found stale
  await waitUntil(() => !served.has("feed:2"), "the check after serving");

  const text = await (await fetch(`http://127.0.0.1:${admin}/metrics`)).text();
  const metrics = new Map<string, number>();
  for (const line of text.split("\n")) {
    if (line === "" || line.startsWith("#")) continue;
    const i = line.lastIndexOf(" ");
    metrics.set(line.slice(0, i), Number(line.slice(i + 1)));
  }
  assert.equal(metrics.get('freshd_hit_age_seconds_count{namespace="feed",endpoint="/feed"}'), 2);
  assert.equal(metrics.get('freshd_served_checks_total{namespace="feed"}'), 1);
  assert.equal(metrics.get('freshd_stale_serves_total{namespace="feed",critical="false"}'), 1);
});

async function freePort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}
