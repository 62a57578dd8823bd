//! The browser tests' harness: a real `koo serve` (embedded store, built-in
//! workers, scheduler) on ephemeral loopback ports, Debian's Chromium driven
//! by playwright-core, and grpcurl to act on koo as a user would.
//!
//! Nothing is mocked. koo is started with port 0 for both listeners and the
//! harness reads the bound addresses from its log; readiness is a health
//! check polled against a deadline. Every process started here is killed
//! when the test process ends, however it ends.

import { spawn, execFile, type ChildProcess } from "node:child_process";
import { createRequire } from "node:module";
import { createInterface } from "node:readline";
import { mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer, request as httpRequest, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import type { AddressInfo } from "node:net";
import type { Browser, BrowserContext, ConsoleMessage, Page } from "playwright-core";

/** How long any awaited event may take before a test fails. */
export const EVENT_TIMEOUT_MS = 15_000;

/** The repository's root: the tests run from target/web-test/ (KOO_ROOT overrides). */
export const ROOT = process.env.KOO_ROOT
  ? resolve(process.env.KOO_ROOT)
  : fileURLToPath(new URL("../../", import.meta.url));
const WEB = join(ROOT, "web");

export const KOO_BIN = process.env.KOO_BIN ?? join(ROOT, "target/debug/koo");
export const GRPCURL = process.env.GRPCURL ?? join(ROOT, "target/tools-venv/bin/grpcurl");
export const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
export const SCREENSHOTS = join(ROOT, "target/dashboard-screenshots");

// a previous run's failures are not this run's
rmSync(join(SCREENSHOTS, "failed"), { recursive: true, force: true });

/** The flags every launch of Chromium gets (the common brief's list). */
const CHROMIUM_FLAGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** The viewport of every page, and so of every screenshot. */
export const VIEWPORT = { width: 1280, height: 900 };

// ---------------------------------------------------------------------------
// Cleanup: every child is killed when this process ends, however it ends.

const children = new Set<ChildProcess>();
const tempDirs = new Set<string>();

function killAll(): void {
  for (const child of children) {
    if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
  }
  children.clear();
  for (const dir of tempDirs) rmSync(dir, { recursive: true, force: true });
  tempDirs.clear();
}
process.on("exit", killAll);
for (const signal of ["SIGINT", "SIGTERM", "SIGHUP"] as const) {
  process.on(signal, () => {
    killAll();
    process.exit(128 + (signal === "SIGINT" ? 2 : signal === "SIGTERM" ? 15 : 1));
  });
}

export function tempDir(prefix: string): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.add(dir);
  return dir;
}

/** Resolves when `check` returns a value other than undefined, polling every `everyMs`; rejects at the deadline. */
export async function waitUntil<T>(
  what: string,
  check: () => Promise<T | undefined> | T | undefined,
  timeoutMs = EVENT_TIMEOUT_MS,
  everyMs = 100,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value !== undefined) return value;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${last ? `: ${String(last)}` : ""}`);
    }
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

// ---------------------------------------------------------------------------
// koo

export interface Koo {
  /** gRPC address, host:port. */
  grpc: string;
  /** HTTP listener address, host:port. */
  http: string;
  /** The page's address (koo's own `/`, or the harness's dist server in front of koo). */
  base: string;
  /** A key sent by `grpcurl` calls unless one is given (auth on). */
  adminKey?: string;
  /** koo's log lines so far (stderr), over restarts. */
  log: string[];
  /** Kills koo (SIGKILL: nothing to keep, the store is in memory). */
  kill(): Promise<void>;
  /** Starts koo again on the same addresses (after `kill`), and waits until it serves. */
  restart(): Promise<void>;
  /** Kills koo and whatever the harness runs in front of it. */
  stop(): Promise<void>;
}

export interface KooOptions {
  env?: Record<string, string>;
  adminKey?: string;
  /** A name for log messages. */
  name?: string;
}

/** The environment of koo's process: the caller's own koo settings removed, so a test sets exactly what it means to. */
function kooEnv(extra: Record<string, string>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!/^(REDIS_|CACHE_|KOO_|TASK_|CELERY_|OTEL_)/.test(k)) env[k] = v;
  }
  return {
    ...env,
    KOO_LISTEN: "127.0.0.1:0",
    KOO_HTTP_LISTEN: "127.0.0.1:0",
    KOO_LOG: "info",
    // quick key counts, so the cache page's figures follow the test's Sets
    KOO_KEY_COUNT_INTERVAL: "0",
    ...extra,
  };
}

interface Process {
  child: ChildProcess;
  grpc: string;
  http: string;
}

/** Spawns `koo serve` and reads its log until it announced both listeners' addresses. */
async function spawnKoo(name: string, env: NodeJS.ProcessEnv, log: string[]): Promise<Process> {
  const child = spawn(KOO_BIN, ["serve"], { env, stdio: ["ignore", "ignore", "pipe"] });
  children.add(child);
  let grpc: string | undefined;
  let http: string | undefined;
  let exited: string | undefined;
  child.on("error", (e) => (exited = `cannot start ${KOO_BIN}: ${e.message}`));
  child.on("exit", (code, signal) => {
    exited ??= `${name} exited (${signal ?? code})`;
    children.delete(child);
  });
  // Drained to the end, so koo never blocks on a full pipe.
  createInterface({ input: child.stderr! }).on("line", (line) => {
    log.push(line);
    if (process.env.KOO_TEST_LOG) process.stderr.write(`[${name}] ${line}\n`);
    const addr = / addr=(\S+)/.exec(line)?.[1];
    if (addr && line.includes("koo serving gRPC")) grpc = addr;
    if (addr && line.includes("koo serving HTTP")) http = addr;
  });
  try {
    await waitUntil(`${name} to announce its addresses`, () => {
      if (exited) throw new Error(exited);
      return grpc && http ? true : undefined;
    });
  } catch (e) {
    child.kill("SIGKILL");
    throw new Error(`${(e as Error).message}\n--- ${name}'s log:\n${log.slice(-30).join("\n")}`);
  }
  return { child, grpc: grpc!, http: http! };
}

async function killProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const gone = new Promise((r) => child.once("exit", r));
  child.kill("SIGKILL");
  await gone;
}

/** Polls grpc.health.v1 until koo answers SERVING. */
async function waitServing(koo: Koo, name: string, proc: Process): Promise<void> {
  await waitUntil(`${name}'s health check to answer SERVING`, async () => {
    if (proc.child.exitCode !== null || proc.child.signalCode !== null) {
      throw new Error(`${name} exited\n--- its log:\n${koo.log.slice(-30).join("\n")}`);
    }
    const out = await grpcurl(koo, "grpc.health.v1.Health/Check", {});
    return out.status === "SERVING" ? true : undefined;
  });
}

/** Starts `koo serve` on ephemeral ports and waits until it is healthy and its page can be loaded. */
export async function startKoo(opts: KooOptions = {}): Promise<Koo> {
  const name = opts.name ?? "koo";
  const log: string[] = [];
  let proc = await spawnKoo(name, kooEnv(opts.env ?? {}), log);
  let front: Server | undefined;
  const koo: Koo = {
    grpc: proc.grpc,
    http: proc.http,
    base: "",
    adminKey: opts.adminKey,
    log,
    kill: () => killProcess(proc.child),
    async restart() {
      await killProcess(proc.child);
      const env = kooEnv({ ...opts.env, KOO_LISTEN: koo.grpc, KOO_HTTP_LISTEN: koo.http });
      proc = await spawnKoo(name, env, log);
      await waitServing(koo, name, proc);
    },
    async stop() {
      front?.closeAllConnections();
      front?.close();
      await killProcess(proc.child);
    },
  };
  await waitServing(koo, name, proc);
  const page = await pageBase(koo);
  koo.base = page.base;
  front = page.server;
  return koo;
}

// ---------------------------------------------------------------------------
// The page's origin

/** The headers koo sends with the dashboard (so the dist server enforces the same policy). */
const CSP =
  "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

const DIST_TYPES: Record<string, string> = {
  "/": "text/html; charset=utf-8",
  "/index.html": "text/html; charset=utf-8",
  "/app.js": "text/javascript; charset=utf-8",
  "/app.css": "text/css; charset=utf-8",
};

/**
 * Where the page is loaded from. koo serves the dashboard at `/` of its HTTP
 * listener; a koo built before that (or `KOO_WEB_DIST=<dir>`, to try a fresh
 * `npm run build` without rebuilding koo) gets a small server in front of it,
 * on a port of its own, that serves the dist files and passes every other
 * request (grpc-web, REST) to koo: the page and its calls keep one origin.
 */
async function pageBase(koo: Koo): Promise<{ base: string; server?: Server }> {
  const own = `http://${koo.http}/`;
  if (!process.env.KOO_WEB_DIST) {
    const res = await fetch(own).catch(() => undefined);
    const body = res?.ok ? await res.text() : "";
    if (body.includes("app.js") && !body.includes("placeholder")) return { base: own };
  }
  const dist = resolve(process.env.KOO_WEB_DIST ?? join(WEB, "dist"));
  const server = await distServer(dist, koo.http);
  const port = (server.address() as AddressInfo).port;
  return { base: `http://127.0.0.1:${port}/`, server };
}

function distServer(dist: string, upstream: string): Promise<Server> {
  return listen(
    createServer((req, res) => {
      const path = (req.url ?? "/").split("?")[0];
      const type = DIST_TYPES[path];
      if (req.method === "GET" && type) {
        const file = path === "/" ? "index.html" : path.slice(1);
        res.writeHead(200, {
          "content-type": type,
          "content-security-policy": CSP,
          "cache-control": "no-store",
          "x-content-type-options": "nosniff",
        });
        res.end(readFileSync(join(dist, file)));
        return;
      }
      forward(req, res, upstream, req.url ?? "/");
    }),
  );
}

/**
 * A reverse proxy that serves koo's HTTP listener under `prefix` (e.g.
 * `/ops/koo/`), as a site might: the page must load its files and make its
 * calls relative to where it sits. Stopped with the test process.
 */
export async function prefixServer(koo: Koo, prefix: string): Promise<{ base: string; close: () => void }> {
  const upstream = new URL(koo.base).host;
  const server = await listen(
    createServer((req, res) => {
      const url = req.url ?? "/";
      if (!url.startsWith(prefix)) {
        res.writeHead(404).end();
        return;
      }
      forward(req, res, upstream, `/${url.slice(prefix.length)}`);
    }),
  );
  const port = (server.address() as AddressInfo).port;
  return {
    base: `http://127.0.0.1:${port}${prefix}`,
    close: () => {
      server.closeAllConnections();
      server.close();
    },
  };
}

function listen(server: Server): Promise<Server> {
  return new Promise((ok, err) => {
    server.once("error", err);
    server.listen(0, "127.0.0.1", () => ok(server));
  });
}

/** Passes one request to `upstream` (host:port) as `path`, streaming both ways. */
function forward(req: IncomingMessage, res: ServerResponse, upstream: string, path: string): void {
  const at = upstream.lastIndexOf(":");
  const trace = (what: string) => {
    if (process.env.KOO_TEST_LOG) process.stderr.write(`[proxy] ${req.method} ${req.url}: ${what}\n`);
  };
  trace("->");
  const up = httpRequest(
    { host: upstream.slice(0, at), port: Number(upstream.slice(at + 1)), method: req.method, path, headers: req.headers },
    (upRes) => {
      trace(`<- ${upRes.statusCode} grpc-status ${upRes.headers["grpc-status"] ?? "(in trailers)"} ${upRes.headers["grpc-message"] ?? ""}`);
      res.writeHead(upRes.statusCode ?? 502, upRes.headers);
      res.flushHeaders(); // a stream's headers reach the page before its first message, as from koo
      upRes.pipe(res);
      // koo gone mid-stream: the browser must see the stream break, as without this server
      upRes.on("close", () => {
        if (!upRes.complete) res.destroy();
      });
    },
  );
  up.on("error", (e) => {
    trace(`upstream error ${e.message}`);
    res.destroy();
  });
  res.on("close", () => up.destroy());
  req.pipe(up);
}

// ---------------------------------------------------------------------------
// grpcurl, as a user would call koo

/** Calls `method` with the JSON `body` through grpcurl (reflection, plaintext) and returns the JSON reply. */
export function grpcurl(
  koo: Koo,
  method: string,
  body: unknown,
  opts: { key?: string | null } = {},
): Promise<any> {
  const key = opts.key === undefined ? koo.adminKey : opts.key;
  const args = ["-plaintext", "-max-time", "10"];
  if (key) args.push("-H", `authorization: Bearer ${key}`);
  args.push("-d", JSON.stringify(body), koo.grpc, method);
  return new Promise((ok, err) => {
    execFile(GRPCURL, args, { timeout: 15_000, maxBuffer: 16 << 20 }, (e, stdout, stderr) => {
      if (e) {
        err(new Error(`grpcurl ${method} ${JSON.stringify(body)}: ${stderr.trim() || e.message}`));
        return;
      }
      try {
        ok(stdout.trim() ? JSON.parse(stdout) : {});
      } catch {
        err(new Error(`grpcurl ${method}: not JSON: ${stdout}`));
      }
    });
  });
}

/** Submits a task with grpcurl and returns its id. */
export async function submitTask(koo: Koo, task: Record<string, unknown>, key?: string): Promise<string> {
  const reply = await grpcurl(koo, "koo.tasks.v1.TaskService/SubmitTask", task, { key });
  const id = reply?.task?.id;
  if (typeof id !== "string") throw new Error(`SubmitTask answered ${JSON.stringify(reply)}`);
  return id;
}

/** `koo auth new-key`: the key and its keys-file entry. */
export function newKey(name: string, role: string): Promise<{ key: string; entry: string }> {
  return new Promise((ok, err) => {
    execFile(KOO_BIN, ["auth", "new-key", "--name", name, "--role", role], (e, stdout, stderr) => {
      if (e) return err(new Error(`koo auth new-key: ${stderr || e.message}`));
      const key = stdout.split("\n").find((l) => l.startsWith("koo_"));
      const at = stdout.indexOf("[[key]]");
      if (!key || at < 0) return err(new Error(`koo auth new-key printed ${stdout}`));
      ok({ key: key.trim(), entry: stdout.slice(at) });
    });
  });
}

// ---------------------------------------------------------------------------
// The browser

/** playwright-core from web/node_modules (the tests run from target/web-test/). */
function loadPlaywright(): typeof import("playwright-core") {
  return createRequire(join(WEB, "package.json"))("playwright-core");
}

export async function launchBrowser(): Promise<Browser> {
  const { chromium } = loadPlaywright();
  return chromium.launch({
    executablePath: CHROMIUM,
    args: CHROMIUM_FLAGS,
    timeout: 30_000,
  });
}

/** A page with its console errors and uncaught exceptions collected. */
export interface WatchedPage {
  page: Page;
  context: BrowserContext;
  /** Every console error and page error so far. */
  errors: string[];
  close(): Promise<void>;
}

/** Pages not closed yet: a test that failed leaves its page here (see `closeLeftPages`). */
const openPages = new Set<WatchedPage>();

/**
 * Closes the pages a failed test left open, first saving a screenshot of each
 * under target/dashboard-screenshots/failed/ and printing what they logged.
 */
export async function closeLeftPages(testName: string): Promise<void> {
  let i = 0;
  for (const p of [...openPages]) {
    const slug = testName.toLowerCase().replace(/[^a-z0-9]+/g, "-").slice(0, 60);
    const path = await screenshot(p.page, `failed/${slug}-${i++}`).catch(() => "(no screenshot)");
    process.stderr.write(
      `left open by "${testName}": ${p.page.url()}, screenshot ${path}\n${p.errors.map((e) => `  ${e}\n`).join("")}`,
    );
    await p.close();
  }
}

/** Opens a fresh context (its own sessionStorage) and page, collecting every console error and page error. */
export async function openPage(browser: Browser, koo: Koo, route = ""): Promise<WatchedPage> {
  const context = await browser.newContext({ viewport: VIEWPORT, baseURL: koo.base });
  context.setDefaultTimeout(EVENT_TIMEOUT_MS);
  const page = await context.newPage();
  const errors: string[] = [];
  page.on("console", (m: ConsoleMessage) => {
    if (m.type() === "error") {
      const from = m.location().url;
      errors.push(`console.error at ${page.url()}: ${m.text()}${from ? ` (${from})` : ""}`);
    }
  });
  page.on("pageerror", (e: Error) => errors.push(`uncaught at ${page.url()}: ${e.message}`));
  page.on("crash", () => errors.push(`the page crashed at ${page.url()}`));
  const watched: WatchedPage = {
    page,
    context,
    errors,
    close: async () => {
      openPages.delete(watched);
      await context.close();
    },
  };
  openPages.add(watched);
  await page.goto(koo.base + route);
  return watched;
}

/** Goes to `#/<route>` within the app (no reload). */
export async function goRoute(page: Page, route: string): Promise<void> {
  await page.evaluate((r) => (location.hash = r), `#/${route}`);
}

/** A full-page screenshot at target/dashboard-screenshots/<name>.png. */
export async function screenshot(page: Page, name: string): Promise<string> {
  const path = join(SCREENSHOTS, `${name}.png`);
  mkdirSync(dirname(path), { recursive: true });
  // from the top, so the sticky header sits where it belongs in the full page
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.screenshot({ path, fullPage: true, animations: "disabled" });
  return path;
}

/** The number in an element's text (thousands separators and units ignored); NaN when none. */
export function numberIn(text: string | null): number {
  const m = /-?\d[\d,]*(\.\d+)?/.exec((text ?? "").replace(/\u202f|\u00a0/g, ""));
  return m ? Number(m[0].replace(/,/g, "")) : NaN;
}

/** Writes a keys file holding the entries and returns its path. */
export function keysFile(entries: string[]): string {
  const dir = tempDir("koo-web-test-");
  const path = join(dir, "keys.toml");
  writeFileSync(path, entries.join("\n"));
  return path;
}
