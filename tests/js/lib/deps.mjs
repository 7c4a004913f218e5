// Where the npm packages of these scripts live, and how to load them.
//
// The scripts stay in the repository but their packages are installed by `tools/test` into a
// cache directory outside it (so that the worktree holds no node_modules). ESM ignores
// NODE_PATH, so the packages are resolved from that directory explicitly.
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import { pathToFileURL } from "node:url";

/** The install directory: `MOLTBOT_TEST_NODE_DIR`, else the default `tools/test` uses. */
export const NODE_DIR =
  process.env.MOLTBOT_TEST_NODE_DIR ||
  join(process.env.XDG_CACHE_HOME || join(homedir(), ".cache"), "moltbot-test", "node");

if (!existsSync(join(NODE_DIR, "node_modules", "@openclaw", "gateway-client"))) {
  // Say how to fix it rather than failing later on a bare module-not-found.
  throw new Error(
    `the OpenClaw client packages are not installed in ${NODE_DIR}; run tools/test (it installs them)`,
  );
}

/** `require` as if from the install directory (for the CommonJS packages: ajv, ws). */
export const requireDep = createRequire(join(NODE_DIR, "package.json"));

/** `import()` of an ESM package installed in the install directory. */
export async function importDep(specifier) {
  return import(pathToFileURL(requireDep.resolve(specifier)).href);
}

/** The protocol's JSON Schema; not in the package's `exports`, so read by path. */
export const SCHEMA_PATH = join(
  NODE_DIR,
  "node_modules",
  "@openclaw",
  "gateway-protocol",
  "protocol.schema.json",
);
