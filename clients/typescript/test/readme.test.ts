/** The README's quick start runs as written, against a real server. */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { inspect } from "node:util";

import * as ts from "typescript";

import { PACKAGE, Servers } from "./harness";

test("the quick start runs as written", async () => {
  const readme = readFileSync(join(PACKAGE, "README.md"), "utf8");
  const section = readme.split("## Quick start")[1] ?? "";
  const code = section.split("```ts")[1]?.split("```")[0] ?? "";
  assert.ok(code.includes('"127.0.0.1:50051"'), "no quick start in the README");

  const servers = new Servers();
  const server = await servers.start();
  try {
    // The imports stay at the top; the rest runs in an async function.
    const lines = code.trim().split("\n");
    const imports = lines.filter((l) => l.startsWith("import "));
    const body = lines.filter((l) => !l.startsWith("import "));
    const source = [...imports, "export async function main(): Promise<void> {", ...body, "}"]
      .join("\n")
      .replace('"@freshd/client"', JSON.stringify(join(__dirname, "..", "src", "index")))
      .replace('"127.0.0.1:50051"', JSON.stringify(server.addr));
    const js = ts.transpileModule(source, {
      compilerOptions: { module: ts.ModuleKind.CommonJS, target: ts.ScriptTarget.ES2022 },
    }).outputText;
    const printed: string[] = [];
    const console = {
      log: (...args: unknown[]) => printed.push(args.map((a) => inspect(a)).join(" ")),
    };
    const module = { exports: {} as { main?: () => Promise<void> } };
    new Function("require", "exports", "module", "console", js)(
      require,
      module.exports,
      module,
      console,
    );
    assert.ok(module.exports.main !== undefined);
    await module.exports.main();
    assert.deepEqual(printed, ["[ 'hello' ]", "[ 'hello' ]", "[ 'edited' ]"]);
  } finally {
    await servers.killAll();
  }
});
