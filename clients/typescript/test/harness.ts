/**
 * Real freshd servers for the tests: spawn the binary on a loopback port,
 * read its address from the JSON log, stop or restart it; a loopback TCP
 * proxy to cut connections; polling with a deadline.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import * as net from "node:net";
import { isAbsolute, join, resolve } from "node:path";
import { createInterface } from "node:readline";
import { setTimeout as sleep } from "node:timers/promises";

/** clients/typescript (the tests run from .test-build/test/). */
export const PACKAGE = resolve(__dirname, "..", "..");
/** The repository. */
export const REPO = resolve(PACKAGE, "..", "..");
/** The language-neutral scenarios. */
export const CONFORMANCE = join(REPO, "tests", "conformance");

let binary: string | undefined;

/**
 * `FRESHD_BIN`, else `<repo>/target/debug/freshd` (or under
 * `CARGO_TARGET_DIR`), built with `cargo build --bin freshd` when missing.
 */
export function freshdBinary(): string {
  if (binary !== undefined) {
    return binary;
  }
  const configured = process.env.FRESHD_BIN;
  if (configured) {
    if (!existsSync(configured) || !statSync(configured).isFile()) {
      throw new Error(`FRESHD_BIN=${configured} does not exist`);
    }
    binary = configured;
    return binary;
  }
  const targetDir = process.env.CARGO_TARGET_DIR || join(REPO, "target");
  const path = join(isAbsolute(targetDir) ? targetDir : join(REPO, targetDir), "debug", "freshd");
  if (!existsSync(path)) {
    const built = spawnSync("cargo", ["build", "--bin", "freshd"], { cwd: REPO, stdio: "inherit" });
    if (built.error !== undefined || built.status !== 0) {
      throw new Error(`${path} is missing and \`cargo build --bin freshd\` failed`);
    }
  }
  binary = path;
  return binary;
}

/** `{lease_ttl: "200ms"}` -> `["--lease-ttl", "200ms"]`. */
export function settingFlags(settings: Record<string, unknown>): string[] {
  const flags: string[] = [];
  for (const [name, value] of Object.entries(settings)) {
    flags.push(`--${name.replace(/_/g, "-")}`, String(value));
  }
  return flags;
}

/** One freshd process on 127.0.0.1. */
export class FreshdServer {
  /** `host:port` once started. */
  addr = "";
  /** The port (0 before the first start: any). */
  port: number;
  /** The epoch the server reported. */
  epoch = 0;
  /** Its log lines. */
  readonly log: string[] = [];
  private proc: ChildProcess | undefined;

  constructor(
    readonly settings: Record<string, unknown> = {},
    port = 0,
  ) {
    this.port = port;
  }

  /** Starts the process and waits for its "freshd serving" line. */
  async start(timeoutMs = 20_000): Promise<this> {
    const args = [
      "--listen",
      `127.0.0.1:${this.port}`,
      "--log-format",
      "json",
      ...settingFlags(this.settings),
    ];
    if (!("admin_listen" in this.settings)) {
      args.push("--admin-listen", "off");
    }
    const proc = spawn(freshdBinary(), args, {
      stdio: ["ignore", "pipe", "pipe"],
      env: { RUST_LOG: "info", ...process.env },
    });
    this.proc = proc;
    const exited = new Promise<number | null>((r) => proc.once("exit", (code) => r(code)));
    const serving = new Promise<Record<string, unknown>>((resolveServing, rejectServing) => {
      let told = false;
      const read = (stream: NodeJS.ReadableStream | null): void => {
        if (stream === null) return;
        createInterface({ input: stream }).on("line", (line) => {
          this.log.push(line);
          if (told) return;
          let record: Record<string, unknown>;
          try {
            record = JSON.parse(line) as Record<string, unknown>;
          } catch {
            return;
          }
          const fields = (record.fields ?? record) as Record<string, unknown>;
          if (fields.message === "freshd serving" && "addr" in fields) {
            told = true;
            resolveServing(fields);
          }
        });
      };
      read(proc.stdout);
      read(proc.stderr);
      void exited.then((code) =>
        rejectServing(
          new Error(`freshd exited with ${code} before serving: ${this.log.join("\n")}`),
        ),
      );
      proc.once("error", rejectServing);
    });
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`freshd did not report serving within ${timeoutMs} ms`)),
        timeoutMs,
      );
    });
    try {
      const fields = await Promise.race([serving, timeout]);
      this.addr = String(fields.addr);
      this.port = Number(this.addr.slice(this.addr.lastIndexOf(":") + 1));
      this.epoch = Number(fields.epoch ?? 0);
    } catch (e) {
      await this.kill();
      throw e;
    } finally {
      clearTimeout(timer);
    }
    return this;
  }

  /** Whether the process runs. */
  get running(): boolean {
    return this.proc !== undefined && this.proc.exitCode === null && this.proc.signalCode === null;
  }

  private async signal(sig: NodeJS.Signals, timeoutMs: number): Promise<boolean> {
    const proc = this.proc;
    if (proc === undefined || !this.running) return true;
    const exited = new Promise<true>((r) => proc.once("exit", () => r(true)));
    proc.kill(sig);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<false>((r) => {
      timer = setTimeout(() => r(false), timeoutMs);
    });
    try {
      return await Promise.race([exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** SIGTERM (graceful drain), then SIGKILL if it lingers. */
  async stop(timeoutMs = 10_000): Promise<void> {
    if (!(await this.signal("SIGTERM", timeoutMs))) {
      await this.kill();
    }
  }

  /** SIGKILL: a crash, nothing drained. */
  async kill(): Promise<void> {
    await this.signal("SIGKILL", 10_000);
  }

  /** A new process on the same port: a new epoch, nothing remembered. */
  async restart(): Promise<this> {
    await this.kill();
    const deadline = Date.now() + 10_000;
    for (;;) {
      try {
        return await this.start();
      } catch (e) {
        // The port may linger for a moment after the old process.
        if (Date.now() > deadline) throw e;
        await sleep(50);
      }
    }
  }
}

/** Starts servers and kills them all at the end of a test. */
export class Servers {
  private readonly all: FreshdServer[] = [];

  /** A fresh server with `settings`. */
  async start(settings: Record<string, unknown> = {}, port = 0): Promise<FreshdServer> {
    const server = new FreshdServer(settings, port);
    this.all.push(server);
    return server.start();
  }

  /** Kills every server started here. */
  async killAll(): Promise<void> {
    await Promise.all(this.all.map((s) => s.kill()));
  }
}

/**
 * Polls `condition` until it returns something truthy, or fails after
 * `timeoutMs`.
 */
export async function waitUntil<T>(
  condition: () => T | Promise<T>,
  what = "a condition",
  timeoutMs = 5000,
  intervalMs = 10,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const result = await condition();
    if (result) return result;
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await sleep(intervalMs);
  }
}

/**
 * A loopback TCP proxy in front of a server, to cut connections: while
 * `blocked` it accepts and closes at once.
 */
export class TcpProxy {
  /** Closes new connections at once while set. */
  blocked = false;
  /** `127.0.0.1:port` once listening. */
  addr = "";
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();

  constructor(private readonly targetPort: number) {
    this.server = net.createServer((downstream) => this.accept(downstream));
  }

  /** Starts listening on a free loopback port. */
  async listen(): Promise<this> {
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", r));
    const address = this.server.address() as net.AddressInfo;
    this.addr = `127.0.0.1:${address.port}`;
    return this;
  }

  private accept(downstream: net.Socket): void {
    if (this.blocked) {
      downstream.destroy();
      return;
    }
    const upstream = net.connect(this.targetPort, "127.0.0.1");
    for (const s of [downstream, upstream]) {
      this.sockets.add(s);
      s.on("error", () => undefined);
      s.on("close", () => {
        this.sockets.delete(s);
        downstream.destroy();
        upstream.destroy();
      });
    }
    downstream.pipe(upstream);
    upstream.pipe(downstream);
  }

  /** Closes every proxied connection. */
  cut(): void {
    for (const s of this.sockets) s.destroy();
    this.sockets.clear();
  }

  /** Stops listening and cuts everything. */
  async close(): Promise<void> {
    this.cut();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}
