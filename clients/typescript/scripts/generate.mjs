// Generates the gRPC stubs of freshd.v1.Coordinator from the repository's
// proto/freshd/v1/coordinator.proto (the single source of truth) into
// src/gen/, with protoc and the ts-proto plugin from node_modules.
//
//   npm run generate            # regenerates when the proto or options changed
//   npm run generate -- --force # regenerates in any case
//
// protoc comes from the system (Debian: apt-get install protobuf-compiler),
// or from $PROTOC.
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const pkg = resolve(here, "..");
const repo = resolve(pkg, "..", "..");
const protoRoot = join(repo, "proto");
const proto = join(protoRoot, "freshd", "v1", "coordinator.proto");
const out = join(pkg, "src", "gen");
const stamp = join(out, ".stamp");
const plugin = join(pkg, "node_modules", ".bin", "protoc-gen-ts_proto");
const protoc = process.env.PROTOC || "protoc";

const options = [
  "outputServices=grpc-js",
  "esModuleInterop=true",
  "env=node",
  "oneof=unions-value",
  "forceLong=bigint",
  "outputJsonMethods=false",
  "outputPartialMethods=false",
  "useOptionals=none",
].join(",");

const tsProtoVersion = JSON.parse(
  readFileSync(join(pkg, "node_modules", "ts-proto", "package.json"), "utf8"),
).version;
const wanted = createHash("sha256")
  .update(readFileSync(proto))
  .update(options)
  .update(tsProtoVersion)
  .digest("hex");

const force = process.argv.includes("--force");
if (!force && existsSync(stamp) && readFileSync(stamp, "utf8") === wanted) {
  process.exit(0);
}
if (!existsSync(plugin)) {
  console.error(`${plugin} is missing: run npm ci first`);
  process.exit(1);
}
rmSync(out, { recursive: true, force: true });
mkdirSync(out, { recursive: true });
try {
  execFileSync(
    protoc,
    [
      `--plugin=protoc-gen-ts_proto=${plugin}`,
      `--ts_proto_out=${out}`,
      `--ts_proto_opt=${options}`,
      `--proto_path=${protoRoot}`,
      proto,
    ],
    { stdio: "inherit" },
  );
} catch (e) {
  if (e && e.code === "ENOENT") {
    console.error(
      `cannot run ${protoc}: install protoc (Debian: apt-get install protobuf-compiler) or set PROTOC`,
    );
  }
  process.exit(1);
}
writeFileSync(stamp, wanted);
