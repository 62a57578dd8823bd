// Bundles the browser tests (TypeScript) into ../target/web-test/ for
// `node --test`. npm packages stay external: the harness loads playwright-core
// from web/node_modules itself (see harness.ts, `loadPlaywright`).
import { build } from "esbuild";
import { fileURLToPath } from "node:url";

const web = fileURLToPath(new URL("..", import.meta.url));

await build({
  absWorkingDir: web,
  entryPoints: ["test/dashboard.test.ts"],
  outdir: "../target/web-test",
  outExtension: { ".js": ".mjs" },
  bundle: true,
  platform: "node",
  format: "esm",
  target: "node20",
  packages: "external",
  sourcemap: "inline",
  logLevel: "warning",
});
