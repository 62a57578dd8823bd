// koo's API as the dashboard sees it: one grpc-web transport to the page's own
// origin (and path prefix), the API key (sessionStorage, never a cookie) sent as
// `authorization: Bearer <key>`, typed clients for every service, readable
// errors, and hooks for server streams (reconnect with backoff) and polls.
import {
  Code,
  ConnectError,
  createClient,
  type CallOptions,
  type Client,
  type Interceptor,
} from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { useEffect, useRef, useState } from "preact/hooks";
import { AuthService } from "./gen/koo/auth/v1/auth_service_pb";
import { CacheService } from "./gen/koo/cache/v1/cache_service_pb";
import { ScheduleService } from "./gen/koo/schedule/v1/schedule_service_pb";
import { TaskService } from "./gen/koo/tasks/v1/task_service_pb";
import { WorkerService } from "./gen/koo/worker/v1/worker_service_pb";

// ---- the API key ------------------------------------------------------------

const KEY_STORAGE = "koo.apiKey";

function readStoredKey(): string {
  try {
    return sessionStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return "";
  }
}

let apiKey = readStoredKey();
// Bumped on every key change, so that streams and polls start again with it.
let keyVersion = 0;
const keyListeners = new Set<() => void>();

export function getApiKey(): string {
  return apiKey;
}

/** Stores the key for this tab (empty removes it) and restarts every call. */
export function setApiKey(key: string): void {
  apiKey = key.trim();
  try {
    if (apiKey) sessionStorage.setItem(KEY_STORAGE, apiKey);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // Storage may be disabled; the key then lasts until the page reloads.
  }
  keyVersion++;
  keyListeners.forEach((l) => l());
}

/** The key's version: a dependency for effects that call koo. */
export function useKeyVersion(): number {
  const [v, setV] = useState(keyVersion);
  useEffect(() => {
    const l = () => setV(keyVersion);
    keyListeners.add(l);
    return () => void keyListeners.delete(l);
  }, []);
  return v;
}

// ---- UNAUTHENTICATED anywhere -----------------------------------------------

const unauthListeners = new Set<(e: ConnectError) => void>();

/** Calls `l` whenever any call fails UNAUTHENTICATED; returns the unsubscribe. */
export function onUnauthenticated(l: (e: ConnectError) => void): () => void {
  unauthListeners.add(l);
  return () => void unauthListeners.delete(l);
}

function notice(e: unknown): void {
  const ce = ConnectError.from(e);
  if (ce.code === Code.Unauthenticated) unauthListeners.forEach((l) => l(ce));
}

async function* watched<T>(it: AsyncIterable<T>): AsyncIterable<T> {
  try {
    yield* it;
  } catch (e) {
    notice(e);
    throw e;
  }
}

const auth: Interceptor = (next) => async (req) => {
  if (apiKey) req.header.set("authorization", `Bearer ${apiKey}`);
  try {
    const res = await next(req);
    if (!res.stream) return res;
    return { ...res, message: watched(res.message) };
  } catch (e) {
    notice(e);
    throw e;
  }
};

// ---- transport and clients --------------------------------------------------

/** The page's own URL minus its file and trailing slash: koo may sit behind a path prefix. */
export function baseUrl(): string {
  return new URL(".", location.href).href.replace(/\/$/, "");
}

const transport = createGrpcWebTransport({
  baseUrl: baseUrl(),
  interceptors: [auth],
});

export const tasks: Client<typeof TaskService> = createClient(TaskService, transport);
export const cache: Client<typeof CacheService> = createClient(CacheService, transport);
export const schedules: Client<typeof ScheduleService> = createClient(ScheduleService, transport);
export const workers: Client<typeof WorkerService> = createClient(WorkerService, transport);
export const authn: Client<typeof AuthService> = createClient(AuthService, transport);

// ---- errors -----------------------------------------------------------------

/** The status code's name as gRPC spells it, e.g. `NOT_FOUND`. */
export function codeName(code: Code): string {
  return (Code[code] ?? "UNKNOWN").replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** "CODE: koo's message" for any error a call can throw. */
export function errorMessage(e: unknown): string {
  const ce = ConnectError.from(e);
  const msg = ce.rawMessage || "(no message)";
  return `${codeName(ce.code)}: ${msg}`;
}

export function errorCode(e: unknown): Code {
  return ConnectError.from(e).code;
}

// ---- connection state (the header's badge) ----------------------------------

export type ConnState = "connecting" | "live" | "reconnecting" | "stopped" | "refused";

let nextConnId = 1;
const conns = new Map<number, ConnState>();
const connListeners = new Set<() => void>();

/** A new id for reportConn. */
export function connId(): number {
  return nextConnId++;
}

/** Sets (or with null, removes) one stream's or poll's state for the header's badge. */
export function reportConn(id: number, state: ConnState | null): void {
  if (state === null) conns.delete(id);
  else conns.set(id, state);
  connListeners.forEach((l) => l());
}

/**
 * The page's connection as one word: `reconnecting` when any stream or poll
 * is, `refused` when koo refused one its credentials (no key, a revoked key,
 * a role that may not read it), `connecting` while one has not answered yet,
 * else `live` (a stream that ended on purpose, or on another error its view
 * shows, counts as live).
 */
export function overallConn(): ConnState {
  const states = [...conns.values()];
  if (states.includes("reconnecting")) return "reconnecting";
  if (states.includes("refused")) return "refused";
  if (states.includes("live") || states.includes("stopped")) return "live";
  return "connecting";
}

/** What a stream's or poll's state says to the badge. */
function badgeState(status: ConnState, code: Code | null): ConnState {
  return status === "stopped" && (code === Code.Unauthenticated || code === Code.PermissionDenied)
    ? "refused"
    : status;
}

export function useOverallConn(): ConnState {
  const [s, setS] = useState(overallConn());
  useEffect(() => {
    const l = () => setS(overallConn());
    connListeners.add(l);
    l();
    return () => void connListeners.delete(l);
  }, []);
  return s;
}

// ---- streams ----------------------------------------------------------------

/** Codes after which reconnecting cannot help (until the key or the inputs change). */
const FATAL = new Set<Code>([
  Code.InvalidArgument,
  Code.NotFound,
  Code.PermissionDenied,
  Code.Unauthenticated,
  Code.Unimplemented,
  Code.FailedPrecondition,
]);

export interface StreamState {
  /** live: open; reconnecting: waiting to open again; stopped: ended for good (see error). */
  status: ConnState;
  /** The latest error (kept while reconnecting; cleared once live again). */
  error: string | null;
  /** The latest error's code, when there is one. */
  code: Code | null;
}

export interface StreamOptions {
  /** Whether a stream that ended without error is done (true) or should be opened again. */
  finished?: () => boolean;
  /** Whether an error cannot be helped by reconnecting; by default the codes in FATAL. */
  fatal?: (e: ConnectError) => boolean;
  /** Called before each reconnect after an error (e.g. to adjust a resume token). */
  onError?: (e: ConnectError) => void;
  /** Start nothing while false. */
  enabled?: boolean;
}

/** How long a stream must stay open without an error to count as live before its first message. */
const QUIET_LIVE_MS = 1500;

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const t = setTimeout(resolve, ms);
    signal.addEventListener(
      "abort",
      () => {
        clearTimeout(t);
        resolve();
      },
      { once: true },
    );
  });
}

/**
 * Runs a server stream while the component is mounted: `open` starts it with
 * the given call options (signal and onHeader must be passed on); each message
 * goes to `onMessage` (the latest one passed is used). A stream that ends or
 * fails is opened again after a backoff (0.5 s doubling to 15 s); leaving the
 * page or changing `deps` aborts it.
 */
export function useStream<T>(
  open: (opts: CallOptions) => AsyncIterable<T>,
  onMessage: (m: T) => void,
  deps: unknown[],
  options: StreamOptions = {},
): StreamState {
  const [state, setState] = useState<StreamState>({ status: "connecting", error: null, code: null });
  const handler = useRef(onMessage);
  handler.current = onMessage;
  const opts = useRef(options);
  opts.current = options;
  const kv = useKeyVersion();
  const enabled = options.enabled ?? true;

  useEffect(() => {
    if (!enabled) return;
    const ac = new AbortController();
    const id = nextConnId++;
    const set = (s: StreamState) => {
      if (ac.signal.aborted) return;
      setState(s);
      reportConn(id, badgeState(s.status, s.code));
    };
    set({ status: "connecting", error: null, code: null });
    (async () => {
      let backoff = 500;
      for (;;) {
        let err: ConnectError | null = null;
        let isLive = false;
        const markLive = () => {
          if (isLive || ac.signal.aborted) return;
          isLive = true;
          backoff = 500;
          set({ status: "live", error: null, code: null });
        };
        // grpc-web over HTTP/1.1 gets the response headers only with the
        // first message (koo's streams may stay quiet for long): a stream
        // still open without an error after a moment counts as live.
        const quiet = setTimeout(markLive, QUIET_LIVE_MS);
        try {
          for await (const m of open({ signal: ac.signal, onHeader: markLive, timeoutMs: 0 })) {
            if (ac.signal.aborted) return;
            markLive();
            handler.current(m);
          }
        } catch (e) {
          err = ConnectError.from(e);
        } finally {
          clearTimeout(quiet);
        }
        if (ac.signal.aborted) return;
        if (err === null) {
          if (opts.current.finished?.()) {
            set({ status: "stopped", error: null, code: null });
            return;
          }
        } else {
          const fatal = opts.current.fatal ?? ((e: ConnectError) => FATAL.has(e.code));
          if (fatal(err)) {
            set({ status: "stopped", error: errorMessage(err), code: err.code });
            return;
          }
          opts.current.onError?.(err);
        }
        set({
          status: "reconnecting",
          error: err ? errorMessage(err) : "the stream ended",
          code: err?.code ?? null,
        });
        await sleep(backoff, ac.signal);
        if (ac.signal.aborted) return;
        backoff = Math.min(backoff * 2, 15_000);
      }
    })();
    return () => {
      ac.abort();
      reportConn(id, null);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, kv, enabled]);

  return state;
}

// ---- polls ------------------------------------------------------------------

export interface PollState<T> {
  data: T | null;
  error: string | null;
  code: Code | null;
  /** Run the call again now (after a write, say). */
  refresh: () => void;
}

/**
 * Calls `fetch` now and every `intervalMs` while mounted (the views without a
 * stream: workers, schedules, dead letters), aborting an unfinished call on
 * unmount; keeps the last good data next to the latest error.
 */
export function usePoll<T>(
  fetch: (opts: CallOptions) => Promise<T>,
  intervalMs: number,
  deps: unknown[],
): PollState<T> {
  const [data, setData] = useState<T | null>(null);
  const [err, setErr] = useState<{ error: string; code: Code } | null>(null);
  const [tick, setTick] = useState(0);
  const fn = useRef(fetch);
  fn.current = fetch;
  const kv = useKeyVersion();

  useEffect(() => {
    const ac = new AbortController();
    const id = nextConnId++;
    let timer: ReturnType<typeof setTimeout> | undefined;
    const run = async () => {
      try {
        const d = await fn.current({ signal: ac.signal });
        if (ac.signal.aborted) return;
        setData(d);
        setErr(null);
        reportConn(id, "live");
      } catch (e) {
        if (ac.signal.aborted) return;
        const ce = ConnectError.from(e);
        setErr({ error: errorMessage(ce), code: ce.code });
        reportConn(id, badgeState(FATAL.has(ce.code) ? "stopped" : "reconnecting", ce.code));
      }
      if (!ac.signal.aborted) timer = setTimeout(run, intervalMs);
    };
    void run();
    return () => {
      ac.abort();
      clearTimeout(timer);
      reportConn(id, null);
    };
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [...deps, kv, tick, intervalMs]);

  return {
    data,
    error: err?.error ?? null,
    code: err?.code ?? null,
    refresh: () => setTick((t) => t + 1),
  };
}
