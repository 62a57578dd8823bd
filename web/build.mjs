// Bundles the dashboard into dist/: app.js (src/main.tsx and everything it
// imports, minified), app.css (the CSS it imports) and index.html (copied).
// These three files are all koo embeds; the build must be deterministic, as
// scripts/test rebuilds them and compares with the committed dist.
import { build } from "esbuild";
import { copyFile, mkdir, readdir, rm } from "node:fs/promises";

const outdir = new URL("./dist/", import.meta.url);
await mkdir(outdir, { recursive: true });
// Nothing but the three files may stay in dist/.
for (const name of await readdir(outdir)) {
  if (!["index.html", "app.js", "app.css"].includes(name)) {
    await rm(new URL(name, outdir), { recursive: true });
  }
}

await build({
  entryPoints: { app: "src/main.tsx" },
  outdir: "dist",
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  platform: "browser",
  sourcemap: false,
  jsx: "automatic",
  jsxImportSource: "preact",
  legalComments: "eof",
  charset: "utf8",
  logLevel: "warning",
});
await copyFile(new URL("./src/index.html", import.meta.url), new URL("index.html", outdir));
