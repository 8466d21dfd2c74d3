/**
 * Tokens and TLS against real servers: principals from a config file,
 * certificates made with the `openssl` command line tool (the TLS tests are
 * skipped without it).
 */
import assert from "node:assert/strict";
import { execFileSync, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, afterEach, before, beforeEach, test } from "node:test";

import {
  Client,
  FreshdError,
  NearCache,
  PermissionDenied,
  ResourceExhausted,
  Unauthenticated,
  Unavailable,
  type ClientOptions,
} from "../src/index";
import { Servers, type FreshdServer } from "./harness";

const HAVE_OPENSSL = spawnSync("openssl", ["version"]).status === 0;
const NO_OPENSSL = HAVE_OPENSSL ? false : "the openssl command is not installed";

/** Each principal's token; the server's config holds only their hashes. */
const TOKENS: Record<string, string> = {
  admin: `fd_${randomBytes(24).toString("base64url")}`,
  feed: `fd_${randomBytes(24).toString("base64url")}`,
};

const SCOPES: Record<string, string> = {
  admin: '{ "*" = ["check", "watch", "fill", "publish", "purge", "admin"] }',
  feed: '{ feed = ["check", "watch", "fill"], "*" = ["check"] }',
};

let dir: string;
let servers: Servers;
let closers: Array<() => unknown>;

before(() => {
  dir = mkdtempSync(join(tmpdir(), "freshd-ts-security-"));
  if (HAVE_OPENSSL) makePki();
});

after(() => rmSync(dir, { recursive: true, force: true }));

beforeEach(() => {
  servers = new Servers();
  closers = [];
});

afterEach(async () => {
  for (const close of closers.reverse()) await close();
  await servers.killAll();
});

function writeConfig(quotas: Record<string, string> = {}): string {
  const lines: string[] = [];
  for (const [name, token] of Object.entries(TOKENS)) {
    lines.push(
      "[[auth.principals]]",
      `name = "${name}"`,
      `token_sha256 = "${createHash("sha256").update(token).digest("hex")}"`,
      `scopes = ${SCOPES[name]}`,
    );
    if (quotas[name] !== undefined) lines.push(`quotas = ${quotas[name]}`);
    lines.push("");
  }
  const path = join(dir, `freshd-${randomBytes(4).toString("hex")}.toml`);
  writeFileSync(path, lines.join("\n"));
  return path;
}

// ------------------------------------------------------------ certificates

function openssl(...args: string[]): void {
  execFileSync("openssl", args, { cwd: dir, stdio: ["ignore", "ignore", "pipe"] });
}

function newCa(name: string): void {
  // prettier-ignore
  openssl(
    "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", `${name}-ca.key`, "-out", `${name}-ca.pem`, "-days", "1",
    "-subj", `/CN=freshd test CA ${name}`,
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign",
  );
}

function leaf(ca: string, name: string, cn: string, extensions: string): void {
  writeFileSync(join(dir, `${name}.ext`), extensions);
  // prettier-ignore
  openssl(
    "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
    "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${cn}`,
  );
  // prettier-ignore
  openssl(
    "x509", "-req", "-in", `${name}.csr`, "-CA", `${ca}-ca.pem`, "-CAkey", `${ca}-ca.key`,
    "-CAcreateserial", "-out", `${name}.pem`, "-days", "1", "-extfile", `${name}.ext`,
  );
}

function makePki(): void {
  newCa("servers");
  newCa("clients");
  newCa("stranger");
  leaf(
    "servers",
    "server",
    "localhost",
    "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
  );
  leaf(
    "clients",
    "client",
    "client.example",
    "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
  );
}

const file = (name: string): string => join(dir, name);

function tlsSettings(mutual = false): Record<string, unknown> {
  const settings: Record<string, unknown> = {
    config: writeConfig(),
    tls_cert: file("server.pem"),
    tls_key: file("server.key"),
  };
  if (mutual) settings.tls_client_ca = file("clients-ca.pem");
  return settings;
}

function client(target: string, options: ClientOptions): Client {
  const c = new Client(target, { timeoutMs: 5000, ...options });
  closers.push(() => c.close());
  return c;
}

// ------------------------------------------------------------------ tokens

async function authed(): Promise<FreshdServer> {
  return servers.start({ config: writeConfig() });
}

test("a known token is accepted", async () => {
  const server = await authed();
  const c = client(server.addr, { token: TOKENS.admin });
  const published = await c.publish(["feed:1"]);
  assert.equal((await c.check("feed:1")).version, published.seq);
  assert.equal((await c.stats()).seq, published.seq);
});

test("a missing or unknown token is unauthenticated, Watch streams too", async () => {
  const server = await authed();
  const missing = await client(server.addr, {})
    .check("feed:1")
    .catch((e: unknown) => e);
  assert.ok(missing instanceof Unauthenticated);
  assert.match(missing.details, /requires a token/);
  assert.equal(missing.codeName, "UNAUTHENTICATED");
  const unknown = client(server.addr, { token: "fd_not_a_known_token" });
  await assert.rejects(
    unknown.check("feed:1"),
    (e: unknown) => e instanceof Unauthenticated && /unknown token/.test(e.details),
  );
  await assert.rejects(unknown.watch({ subscribe: ["feed:"] }), Unauthenticated);
});

test("out-of-scope calls are permission denied, naming the scope", async () => {
  const server = await authed();
  const c = client(server.addr, { token: TOKENS.feed });
  await c.fill("feed:1", ["posts:1"]); // fill in feed, check on "*"
  assert.ok((await c.check("posts:1")).seq >= 0);
  const denied = await c.publish(["feed:1"]).catch((e: unknown) => e);
  assert.ok(denied instanceof PermissionDenied);
  assert.match(denied.details, /"feed"/);
  assert.match(denied.details, /"publish"/);
  await assert.rejects(
    c.watch({ subscribe: ["posts:"] }),
    (e: unknown) => e instanceof PermissionDenied && /watch/.test(e.details),
  );
});

test("a quota is resource exhausted, naming it", async () => {
  const server = await servers.start({ config: writeConfig({ feed: "{ streams = 1 }" }) });
  const c = client(server.addr, { token: TOKENS.feed });
  const first = await c.watch({ subscribe: ["feed:"] });
  closers.push(() => first.cancel());
  await assert.rejects(
    c.watch({ subscribe: ["feed:"] }),
    (e: unknown) => e instanceof ResourceExhausted && /quota streams/.test(e.details),
  );
});

// --------------------------------------------------------------------- TLS

test("TLS with a CA as a file, a Buffer or PEM text", { skip: NO_OPENSSL }, async () => {
  const server = await servers.start(tlsSettings());
  const ca = file("servers-ca.pem");
  for (const rootCertificates of [ca, readFileSync(ca), readFileSync(ca, "utf8")]) {
    const c = client(server.addr, {
      token: TOKENS.admin,
      rootCertificates,
      serverName: "localhost",
    });
    assert.ok(c.tls);
    await c.publish(["feed:1"]);
  }
  // The certificate names 127.0.0.1 too: no override needed, https:// works.
  const c = client(`https://${server.addr}`, { token: TOKENS.admin, rootCertificates: ca });
  await c.check("feed:1");
});

test(
  "TLS refuses a server from another CA, and plaintext gets nowhere",
  { skip: NO_OPENSSL },
  async () => {
    const server = await servers.start(tlsSettings());
    const stranger = client(server.addr, {
      token: TOKENS.admin,
      rootCertificates: file("stranger-ca.pem"),
      serverName: "localhost",
      timeoutMs: 3000,
    });
    await assert.rejects(stranger.check("feed:1"), Unavailable);
    const plain = client(server.addr, { token: TOKENS.admin, timeoutMs: 3000 });
    await assert.rejects(plain.check("feed:1"), FreshdError);
  },
);

test("mutual TLS needs a client certificate", { skip: NO_OPENSSL }, async () => {
  const server = await servers.start(tlsSettings(true));
  const base = { rootCertificates: file("servers-ca.pem"), serverName: "localhost" };
  const full = client(server.addr, {
    ...base,
    token: TOKENS.admin,
    certificateChain: file("client.pem"),
    privateKey: file("client.key"),
  });
  await full.publish(["feed:1"]);
  // The handshake passes; the token is still required.
  const anonymous = client(server.addr, {
    ...base,
    certificateChain: readFileSync(file("client.pem")),
    privateKey: readFileSync(file("client.key")),
  });
  await assert.rejects(anonymous.check("feed:1"), Unauthenticated);
  const noCertificate = client(server.addr, { ...base, token: TOKENS.admin, timeoutMs: 3000 });
  await assert.rejects(noCertificate.check("feed:1"), Unavailable);
});

test("a Watch stream over TLS with a token gets notices", { skip: NO_OPENSSL }, async () => {
  const server = await servers.start(tlsSettings());
  const options = { rootCertificates: file("servers-ca.pem"), serverName: "localhost" };
  const reader = client(server.addr, { ...options, token: TOKENS.feed });
  const writer = client(server.addr, { ...options, token: TOKENS.admin });
  const stream = await reader.watch({ clientId: "reader", subscribe: ["feed:"] });
  closers.push(() => stream.cancel());
  const published = await writer.publish(["feed:user:1"]);
  const synced = await stream.sync(5000);
  assert.deepEqual(
    synced.notices.map((n) => [n.key, n.seq]),
    [["feed:user:1", published.seq]],
  );
  // Past the reader's scope, nothing arrives and nothing fails.
  await writer.publish(["posts:1"]);
  assert.deepEqual((await stream.sync(5000)).notices, []);
});

test("a NearCache works over TLS with a token", { skip: NO_OPENSSL }, async () => {
  const server = await servers.start(tlsSettings());
  const c = client(server.addr, {
    token: TOKENS.admin,
    rootCertificates: file("servers-ca.pem"),
    serverName: "localhost",
  });
  const cache = new NearCache<string>(c, { onError: "raise" });
  closers.push(() => cache.close());
  assert.ok(await cache.waitWatching(5000));
  const origin = { "posts:1": "hello" };
  const load = (): { value: string; dependencies: string[] } => ({
    value: origin["posts:1"],
    dependencies: ["posts:1"],
  });
  assert.equal(await cache.get("feed:1", load), "hello");
  origin["posts:1"] = "edited";
  await c.publish(["posts:1"]);
  assert.equal(await cache.get("feed:1", load), "edited");
});
