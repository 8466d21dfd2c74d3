/**
 * Runs every scenario of tests/conformance/ (the format is in its README)
 * against a fresh real server, through the typed API.
 */
import assert from "node:assert/strict";
import { readdirSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";

import {
  Client,
  FreshdError,
  type Change,
  type CheckItem,
  type Policy,
  type WatchStream,
} from "../src/index";
import { CONFORMANCE, Servers } from "./harness";

type Json = null | boolean | number | bigint | string | Json[] | { [key: string]: Json };
type Obj = { [key: string]: Json };

const SCENARIOS = readdirSync(CONFORMANCE)
  .filter((f) => f.endsWith(".json"))
  .sort()
  .map((f) => join(CONFORMANCE, f));

// ------------------------------------------------------------ conversion

const camel = (name: string): string =>
  name.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase());
const snake = (name: string): string => name.replace(/[A-Z]/g, (c) => `_${c.toLowerCase()}`);

/** Request fields as the typed API names them (camelCase, recursively). */
function camelize(value: Json): unknown {
  if (Array.isArray(value)) return value.map(camelize);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [camel(k), camelize(v)]));
  }
  return value;
}

/**
 * A result as the scenarios see it: proto field names, every field with its
 * value, enums as names without their prefix (the typed API's already).
 */
export function toDict(value: unknown): Json {
  if (Array.isArray(value)) return value.map(toDict);
  if (value !== null && typeof value === "object") {
    const out: Obj = {};
    for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
      if (k === "type" || v === undefined) continue; // a watch event's tag; an unset optional
      out[snake(k)] = toDict(v);
    }
    return out;
  }
  if (typeof value === "bigint" && value <= BigInt(Number.MAX_SAFE_INTEGER)) {
    return Number(value); // a lease token stays a bigint when it must
  }
  return value as Json;
}

// -------------------------------------------------------------- matching

const isNumber = (x: unknown): x is number | bigint =>
  typeof x === "number" || typeof x === "bigint";
const show = (x: unknown): string =>
  JSON.stringify(x, (_, v: unknown) => (typeof v === "bigint" ? `${v}` : v));
const sameNumber = (a: number | bigint, b: number | bigint): boolean =>
  typeof a === "number" && typeof b === "number"
    ? a === b
    : Number.isInteger(Number(a)) && Number.isInteger(Number(b)) && BigInt(a) === BigInt(b);

/**
 * `expected` as a subset of `actual`: objects by their keys, lists element
 * by element with the same length, numbers as numbers.
 */
export function match(expected: Json, actual: Json | undefined, where = "response"): void {
  if (Array.isArray(expected)) {
    assert.ok(Array.isArray(actual), `${where}: expected a list, got ${show(actual)}`);
    assert.ok(
      expected.length === actual.length,
      `${where}: expected ${expected.length} elements, got ${actual.length}: ${show(actual)}`,
    );
    expected.forEach((e, i) => match(e, actual[i], `${where}[${i}]`));
  } else if (expected !== null && typeof expected === "object") {
    assert.ok(
      actual !== null && typeof actual === "object" && !Array.isArray(actual),
      `${where}: expected an object, got ${show(actual)}`,
    );
    for (const [key, value] of Object.entries(expected)) {
      assert.ok(key in actual, `${where}: no field ${show(key)} in ${show(actual)}`);
      match(value, actual[key], `${where}.${key}`);
    }
  } else if (typeof expected === "boolean" || typeof actual === "boolean") {
    assert.ok(expected === actual, `${where}: expected ${show(expected)}, got ${show(actual)}`);
  } else if (isNumber(expected) || isNumber(actual)) {
    let e: Json = expected;
    if (typeof e === "string" && /^-?\d+$/.test(e)) e = Number(e);
    assert.ok(
      isNumber(e) && isNumber(actual) && sameNumber(e, actual),
      `${where}: expected ${show(expected)}, got ${show(actual)}`,
    );
  } else {
    assert.ok(expected === actual, `${where}: expected ${show(expected)}, got ${show(actual)}`);
  }
}

/** A response field by name (dots and list indexes for nested ones). */
function lookup(response: Json, path: string): Json {
  let value: Json = response;
  for (const part of path.split(".")) {
    if (Array.isArray(value)) value = value[Number(part)] as Json;
    else if (value !== null && typeof value === "object") {
      assert.ok(part in value, `no field ${part} to save in ${show(response)}`);
      value = value[part] as Json;
    } else assert.fail(`no field ${part} to save in ${show(response)}`);
  }
  return value;
}

// ----------------------------------------------------------------- runner

/** Takes the named fields of a step, failing on any other. */
function fields(args: Obj, op: string, allowed: string[]): Record<string, unknown> {
  for (const key of Object.keys(args)) {
    assert.ok(allowed.includes(key), `${op} takes no field ${JSON.stringify(key)}`);
  }
  return camelize(args) as Record<string, unknown>;
}

/** Interprets one scenario's steps with the typed client. */
export class Runner {
  readonly vars: Record<string, Json> = {};
  private readonly streams = new Map<string, WatchStream>();

  constructor(private readonly client: Client) {}

  /** Cancels every stream still open. */
  close(): void {
    for (const stream of this.streams.values()) stream.cancel();
  }

  async run(steps: Obj[]): Promise<void> {
    for (const [i, step] of steps.entries()) {
      try {
        await this.step({ ...step });
      } catch (e) {
        if (e instanceof assert.AssertionError) {
          throw new assert.AssertionError({
            message: `step ${i} (${String(step.op)}): ${e.message}\n  step: ${show(step)}`,
          });
        }
        throw e;
      }
    }
  }

  private substitute(value: Json): Json {
    if (typeof value === "string" && value.startsWith("$")) {
      const name = value.slice(1);
      assert.ok(
        name in this.vars,
        `variable ${value} is not set (have ${JSON.stringify(Object.keys(this.vars).sort())})`,
      );
      return this.vars[name] as Json;
    }
    if (Array.isArray(value)) return value.map((v) => this.substitute(v));
    if (value !== null && typeof value === "object") {
      return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, this.substitute(v)]));
    }
    return value;
  }

  private async step(step: Obj): Promise<void> {
    const { op, expect, expect_error, expect_error_contains, save, ...rest } = step;
    assert.ok(typeof op === "string", "a step without an op");
    const handler = this.ops[op];
    assert.ok(handler !== undefined, `unknown op ${JSON.stringify(op)}`);
    const args = this.substitute(rest) as Obj;
    let response: Json | undefined;
    try {
      response = await handler(args);
    } catch (e) {
      if (!(e instanceof FreshdError)) throw e;
      assert.ok(expect_error !== undefined, `failed with ${e.codeName}: ${e.details}`);
      assert.ok(
        e.codeName === expect_error,
        `expected ${String(expect_error)}, got ${e.codeName}: ${e.details}`,
      );
      if (expect_error_contains !== undefined) {
        assert.ok(
          e.details.includes(String(expect_error_contains)),
          `expected the message to contain ${JSON.stringify(expect_error_contains)}: ${JSON.stringify(e.details)}`,
        );
      }
      return;
    }
    assert.ok(
      expect_error === undefined,
      `expected ${String(expect_error)}, got success: ${show(response)}`,
    );
    if (response !== null && typeof response === "object" && !Array.isArray(response)) {
      const epoch = response.epoch;
      if (typeof epoch === "number" && epoch !== 0) this.vars.epoch = epoch;
    }
    if (expect !== undefined) match(this.substitute(expect), response);
    for (const [name, field] of Object.entries((save ?? {}) as Obj)) {
      assert.ok(response !== undefined, `nothing to save from ${op}`);
      this.vars[name] = lookup(response, String(field));
    }
  }

  private stream(args: Obj): WatchStream {
    const name = String(args.stream);
    const stream = this.streams.get(name);
    assert.ok(stream !== undefined, `no open stream ${JSON.stringify(name)}`);
    return stream;
  }

  private readonly ops: Record<string, (a: Obj) => Promise<Json | undefined>> = {
    publish: async (a) => {
      const { changes, ...o } = fields(a, "publish", ["changes", "client_id"]);
      return toDict(await this.client.publish(changes as Change[], o));
    },
    fill: async (a) => {
      const allowed = [
        "key",
        "dependencies",
        "ttl_ms",
        "observed_seq",
        "epoch",
        "lease_token",
        "client_id",
      ];
      const { key, dependencies, ...o } = fields(a, "fill", allowed);
      return toDict(await this.client.fill(key as string, (dependencies ?? []) as string[], o));
    },
    check: async (a) => {
      const allowed = [
        "key",
        "version",
        "age_ms",
        "epoch",
        "min_seq",
        "endpoint",
        "served",
        "client_id",
      ];
      const { key, version, ...o } = fields(a, "check", allowed);
      return toDict(await this.client.check(key as string, (version ?? 0) as number, o));
    },
    check_batch: async (a) => {
      const allowed = ["items", "epoch", "min_seq", "endpoint", "client_id"];
      const { items, ...o } = fields(a, "check_batch", allowed);
      return toDict(await this.client.checkBatch(items as CheckItem[], o));
    },
    inspect: async (a) => {
      const { key } = fields(a, "inspect", ["key"]);
      return toDict(await this.client.inspect(key as string));
    },
    stats: async (a) => {
      fields(a, "stats", []);
      return toDict(await this.client.stats());
    },
    lease: async (a) => {
      const { key, ...o } = fields(a, "lease", ["key", "min_seq"]);
      return toDict(await this.client.lease(key as string, o));
    },
    purge: async (a) => {
      const allowed = ["prefix", "dry_run", "hard", "confirm", "jitter_ms", "client_id"];
      const { prefix, ...o } = fields(a, "purge", allowed);
      return toDict(await this.client.purge(prefix as string, o));
    },
    set_policy: async (a) => {
      const { namespace, policy } = fields(a, "set_policy", ["namespace", "policy"]);
      return toDict(await this.client.setPolicy(namespace as string, policy as Partial<Policy>));
    },
    get_policy: async (a) => {
      const { namespace } = fields(a, "get_policy", ["namespace"]);
      return toDict(await this.client.getPolicy(namespace as string));
    },
    sleep: async (a) => {
      const { ms } = fields(a, "sleep", ["ms"]);
      await sleep(ms as number);
      return undefined;
    },
    watch_open: async (a) => {
      const allowed = [
        "stream",
        "client_id",
        "no_loop",
        "resume",
        "track",
        "subscribe",
        "refusals_in_band",
      ];
      const { stream: name, ...o } = fields(a, "watch_open", allowed);
      assert.ok(
        !this.streams.has(name as string),
        `stream ${JSON.stringify(name)} is already open`,
      );
      const stream = await this.client.watch({ ...o, startTimeoutMs: 5000 });
      this.streams.set(name as string, stream);
      return toDict(await stream.started);
    },
    watch_send: async (a) => {
      const stream = this.stream(a);
      const { stream: _name, ...rest } = a;
      const entries = Object.entries(rest);
      assert.ok(entries.length === 1, `watch_send takes one request: ${JSON.stringify(rest)}`);
      const [kind, value] = entries[0]!;
      switch (kind) {
        case "ack":
          stream.ack(value as number);
          break;
        case "track":
        case "untrack":
        case "subscribe":
        case "unsubscribe":
          stream[kind](value as string[]);
          break;
        default:
          assert.fail(`watch_send cannot send ${kind}`);
      }
      return undefined;
    },
    watch_sync: async (a) => {
      const synced = await this.stream(a).sync(10_000);
      return {
        notices: synced.notices.map(toDict),
        resets: synced.resets.map(toDict),
        refused: synced.refused.map((r) => ({
          request: r.request,
          code: r.codeName,
          message: r.message,
        })),
        progress: synced.progress.seq,
      };
    },
    watch_close: async (a) => {
      const stream = this.stream(a);
      stream.close();
      // The server ends the stream once it reads the close: wait for it, so
      // that the next steps find it gone.
      assert.ok(await stream.waitEnded(5000), "the server did not end the stream");
      return undefined;
    },
  };
}

// ------------------------------------------------------------------ tests

const servers = new Servers();
after(() => servers.killAll());

test("the suite is there", () => {
  assert.ok(SCENARIOS.length > 0, `no scenario in ${CONFORMANCE}`);
});

for (const path of SCENARIOS) {
  const name = path.slice(path.lastIndexOf("/") + 1, -".json".length);
  test(`conformance: ${name}`, async () => {
    const scenario = JSON.parse(readFileSync(path, "utf8")) as Obj;
    const server = await servers.start((scenario.server ?? {}) as Record<string, unknown>);
    const client = new Client(server.addr, { timeoutMs: 5000 });
    const runner = new Runner(client);
    try {
      await runner.run(scenario.steps as Obj[]);
    } finally {
      runner.close();
      client.close();
      await server.kill();
    }
  });
}

// ---------------------------------------------- the runner checks for real

test("match is a subset match that fails on differences", () => {
  const actual: Obj = {
    freshness: "FRESH",
    version: 7,
    results: [{ decision: "FRESH" }],
    critical: false,
  };
  match({ freshness: "FRESH", version: 7 }, actual);
  match({ results: [{}] }, actual);
  match({ version: "7" }, actual); // a 64-bit integer written as a string
  for (const wrong of [
    { freshness: "STALE" },
    { version: 8 },
    { results: [] },
    { results: [{ decision: "FRESH" }, { decision: "FRESH" }] },
    { critical: 0 },
    { missing: 1 },
  ] as Obj[]) {
    assert.throws(() => match(wrong, actual), assert.AssertionError);
  }
});

test("a wrong expectation fails the scenario", async () => {
  const server = await servers.start();
  const client = new Client(server.addr, { timeoutMs: 5000 });
  try {
    const steps: Obj[] = [
      {
        op: "fill",
        key: "k",
        dependencies: ["d"],
        ttl_ms: 60000,
        observed_seq: 0,
        save: { v: "version" },
      },
      { op: "publish", changes: [{ key: "d" }] },
      { op: "check", key: "k", version: "$v", expect: { freshness: "FRESH" } },
    ];
    await assert.rejects(
      new Runner(client).run(steps),
      /step 2 \(check\).*expected "FRESH", got "STALE"/s,
    );
    await assert.rejects(
      new Runner(client).run([{ op: "stats", expect_error: "ABORTED" }]),
      /expected ABORTED, got success/,
    );
    await assert.rejects(
      new Runner(client).run([{ op: "inspect", key: "nothing" }]),
      /failed with NOT_FOUND/,
    );
    await assert.rejects(
      new Runner(client).run([{ op: "check", key: "k", version: "$nope" }]),
      /variable \$nope is not set/,
    );
    const converted = toDict(await client.check("k", 2 ** 40)) as Obj;
    assert.equal(converted.freshness, "STALE");
    assert.equal(converted.decision, "REFETCH");
    assert.ok(typeof converted.epoch === "number" && converted.epoch > 0);
  } finally {
    client.close();
    await server.kill();
  }
});
