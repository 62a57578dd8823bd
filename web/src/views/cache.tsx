// The cache page: CacheService.WatchMetrics live (hit ratios per level,
// latency percentiles per operation, operations per second, memory and
// compression), and a key browser over ListKeys with view (Get), delete
// (writers) and clear level (admins, behind a confirmation).
import { useMemo, useRef, useState } from "preact/hooks";
import { cache, errorMessage, useStream } from "../api";
import { useCaller } from "../session";
import { Button, Card, ConfirmButton, ErrorBanner, Notice, PageHead, Stat, Stats, Table } from "../ui/components";
import { Chart, useRolling } from "../ui/chart";
import { durationMs, formatCount, formatDuration, formatMs, formatTime, pretty, tsMs, valueJson } from "../format";
import {
  CacheLevel,
  type CacheCounters,
  type CacheMetrics,
  type GetResponse,
} from "../gen/koo/cache/v1/cache_service_pb";

const LEVELS: CacheLevel[] = [CacheLevel.APP, CacheLevel.DB, CacheLevel.API, CacheLevel.SESSION];

/** `app` for CacheLevel.APP. */
function levelName(l: CacheLevel): string {
  return (CacheLevel[l] ?? "UNSPECIFIED").toLowerCase();
}

function formatBytes(n: bigint | number | undefined): string {
  if (n === undefined) return "–";
  let v = Number(n);
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let u = 0;
  while (Math.abs(v) >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return u === 0 ? `${v} B` : `${v.toFixed(v < 10 ? 2 : 1)} ${units[u]}`;
}

function formatPercent(ratio: number | undefined): string {
  if (ratio === undefined || !Number.isFinite(ratio)) return "–";
  return `${(ratio * 100).toFixed(1)}%`;
}

// ---- metrics ------------------------------------------------------------------

/** Operations whose latency the chart can show, in the order koo names them. */
const OPERATIONS = ["get", "set", "delete", "get_many", "set_many", "delete_many", "list_keys", "clear_level"];

function Metrics() {
  const [m, setM] = useState<CacheMetrics | null>(null);
  const [op, setOp] = useState("get");
  // hit ratio (%): all levels, then each level
  const hitRatio = useRolling(1 + LEVELS.length, 180);
  // operations per second from the counters' deltas: hits, misses, sets, deletes
  const ops = useRolling(4, 180);
  // the chosen operation's p50, p95, p99 (ms)
  const latency = useRolling(3, 180, op);
  // each level's p95 (ms) over the operations that named it
  const levelLatency = useRolling(LEVELS.length, 180);
  const prev = useRef<{ t: number; c: CacheCounters } | null>(null);
  const opRef = useRef(op);
  opRef.current = op;

  const stream = useStream(
    (o) => cache.watchMetrics({ interval: { seconds: 1n } }, o),
    (r) => {
      const snap = r.metrics;
      if (!snap) return;
      setM(snap);
      const t = (tsMs(snap.sampleTime) ?? Date.now()) / 1000;
      const total = snap.total;
      const byLevel = new Map(snap.levels.map((l) => [l.level, l.counters]));
      // a level nobody read has no ratio (a gap, not a line at 0%)
      const ratio = (c: CacheCounters | undefined) => (c && c.hits + c.misses > 0n ? c.hitRatio * 100 : null);
      hitRatio.push(t, [ratio(total), ...LEVELS.map((l) => ratio(byLevel.get(l)))]);
      if (total) {
        const p = prev.current;
        if (p && t > p.t) {
          const dt = t - p.t;
          const rate = (a: bigint, b: bigint) => Math.max(0, Number(a - b)) / dt;
          ops.push(t, [
            rate(total.hits, p.c.hits),
            rate(total.misses, p.c.misses),
            rate(total.sets, p.c.sets),
            rate(total.deletes, p.c.deletes),
          ]);
        }
        prev.current = { t, c: total };
      }
      const lat = snap.latencies.find((l) => l.operation === opRef.current && l.count > 0n);
      latency.push(t, [durationMs(lat?.p50), durationMs(lat?.p95), durationMs(lat?.p99)]);
      const levelLat = new Map(snap.levels.map((l) => [l.level, l.latency]));
      levelLatency.push(
        t,
        LEVELS.map((l) => {
          const x = levelLat.get(l);
          return x && x.count > 0n ? durationMs(x.p95) : null;
        }),
      );
    },
    [],
  );

  const total = m?.total;
  const operations = useMemo(() => {
    const names = new Set(OPERATIONS);
    m?.latencies.forEach((l) => names.add(l.operation));
    return [...names];
  }, [m?.latencies.length]);
  const savedPercent =
    m && m.bytesWrittenRaw > 0n ? Number(m.bytesSaved) / Number(m.bytesWrittenRaw) : undefined;

  return (
    <>
      {stream.status === "reconnecting" && (
        <Notice tone="warn">reconnecting to the metrics stream{stream.error ? ` (${stream.error})` : ""}</Notice>
      )}
      <ErrorBanner error={stream.status === "stopped" ? stream.error : null} />
      {m?.partial && <Notice tone="warn">Some figures are missing: {m.partialReason || "the backend could not be read"}</Notice>}
      <Card
        title="Cache"
        actions={
          m && (
            <span class="muted small" data-testid="cache-instances">
              {m.instanceCount === 1 ? "1 koo instance" : `${m.instanceCount} koo instances`}
              {m.uptime ? `, this one up ${formatDuration(m.uptime)}` : ""}
            </span>
          )
        }
      >
        <Stats>
          <Stat label="hit ratio" value={formatPercent(total?.hitRatio)} testid="cache-hit-ratio" />
          <Stat label="hits" value={formatCount(total?.hits)} testid="cache-hits" />
          <Stat label="misses" value={formatCount(total?.misses)} testid="cache-misses" />
          <Stat label="sets" value={formatCount(total?.sets)} testid="cache-sets" />
          <Stat label="deletes" value={formatCount(total?.deletes)} />
          <Stat
            label="errors"
            value={formatCount(total?.errors)}
            tone={total && total.errors > 0n ? "bad" : undefined}
            hint={total ? `error rate ${formatPercent(total.errorRate)}` : undefined}
          />
          <Stat
            label="keys"
            value={formatCount(total?.keys)}
            hint={m?.keysCountedAt ? `counted at ${formatTime(m.keysCountedAt)}` : undefined}
            testid="cache-keys"
          />
          <Stat label="backend memory" value={formatBytes(m?.backendUsedMemoryBytes)} testid="cache-memory" />
          <Stat
            label={savedPercent === undefined ? "compression saved" : `compression saved (${formatPercent(savedPercent)})`}
            value={formatBytes(m?.bytesSaved)}
            hint={m ? `${formatBytes(m.bytesWrittenRaw)} written, ${formatBytes(m.bytesWrittenStored)} stored` : undefined}
            testid="cache-saved"
          />
        </Stats>
      </Card>
      <div class="grid">
        <Card title="Hit ratio (%)">
          <Chart
            rolling={hitRatio}
            testid="cache-chart-hits"
            unit="%"
            decimals={1}
            series={[{ label: "all" }, ...LEVELS.map((l) => ({ label: levelName(l) }))]}
          />
        </Card>
        <Card title="Operations per second">
          <Chart
            rolling={ops}
            testid="cache-chart-ops"
            unit="/s"
            series={[{ label: "hits" }, { label: "misses" }, { label: "sets" }, { label: "deletes" }]}
          />
        </Card>
      </div>
      <div class="grid">
        <Card
          title="Latency (ms)"
          actions={
            <label class="field">
              operation
              <select
                data-testid="cache-latency-op"
                value={op}
                onChange={(e) => setOp((e.target as HTMLSelectElement).value)}
              >
                {operations.map((o) => (
                  <option key={o} value={o}>
                    {o}
                  </option>
                ))}
              </select>
            </label>
          }
        >
          <Chart
            rolling={latency}
            testid="cache-chart-latency"
            unit=" ms"
            decimals={3}
            series={[{ label: `${op} p50` }, { label: `${op} p95` }, { label: `${op} p99` }]}
          />
        </Card>
        <Card title="Latency per level, p95 (ms)">
          <Chart
            rolling={levelLatency}
            testid="cache-chart-level-latency"
            unit=" ms"
            decimals={3}
            series={LEVELS.map((l) => ({ label: levelName(l) }))}
          />
        </Card>
      </div>
      <div class="grid">
        <Card title="Latency per operation" class="flush">
          <Table testid="cache-latencies" head={["operation", "count", "p50", "p95", "p99"]} empty="no operations yet">
            {(m?.latencies ?? []).map((l) => (
              <tr key={l.operation}>
                <td>{l.operation}</td>
                <td class="num">{formatCount(l.count)}</td>
                <td class="num">{l.count > 0n ? formatLatency(l.p50) : "–"}</td>
                <td class="num">{l.count > 0n ? formatLatency(l.p95) : "–"}</td>
                <td class="num">{l.count > 0n ? formatLatency(l.p99) : "–"}</td>
              </tr>
            ))}
          </Table>
        </Card>
      </div>
      <Card title="Levels" class="flush">
        <Table
          testid="cache-levels"
          head={["level", "keys", "hits", "misses", "hit ratio", "sets", "deletes", "errors", "ops", "p50", "p95", "p99"]}
          empty="no figures yet"
        >
          {(m?.levels ?? []).map((l) => (
            <tr key={l.level}>
              <td>{levelName(l.level)}</td>
              <td class="num">{formatCount(l.counters?.keys)}</td>
              <td class="num">{formatCount(l.counters?.hits)}</td>
              <td class="num">{formatCount(l.counters?.misses)}</td>
              <td class="num">
                {l.counters && l.counters.hits + l.counters.misses > 0n ? formatPercent(l.counters.hitRatio) : "–"}
              </td>
              <td class="num">{formatCount(l.counters?.sets)}</td>
              <td class="num">{formatCount(l.counters?.deletes)}</td>
              <td class="num">{formatCount(l.counters?.errors)}</td>
              <td class="num">{formatCount(l.latency?.count)}</td>
              <td class="num">{l.latency && l.latency.count > 0n ? formatLatency(l.latency.p50) : "–"}</td>
              <td class="num">{l.latency && l.latency.count > 0n ? formatLatency(l.latency.p95) : "–"}</td>
              <td class="num">{l.latency && l.latency.count > 0n ? formatLatency(l.latency.p99) : "–"}</td>
            </tr>
          ))}
        </Table>
      </Card>
    </>
  );
}

function formatLatency(d: Parameters<typeof durationMs>[0]): string {
  const ms = durationMs(d);
  if (ms === null) return "–";
  return ms < 1 ? `${Math.round(ms * 1000)} µs` : formatMs(ms);
}

// ---- key browser ----------------------------------------------------------------

const PAGE_SIZE = 50;
/** Bytes of a value shown at most; the rest is left out with a note. */
const VIEW_LIMIT = 64 * 1024;

interface Listing {
  level: CacheLevel;
  pattern: string;
  keys: string[];
  /** The token of this page (empty for the first), and those of the pages before it. */
  tokens: string[];
  next: string;
}

function KeyBrowser() {
  const caller = useCaller();
  const [level, setLevel] = useState<CacheLevel>(CacheLevel.APP);
  const [pattern, setPattern] = useState("*");
  const [listing, setListing] = useState<Listing | null>(null);
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  const [viewed, setViewed] = useState<{ level: CacheLevel; key: string; reply: GetResponse } | null>(null);
  const [busy, setBusy] = useState(false);

  const list = async (lvl: CacheLevel, pat: string, tokens: string[]) => {
    setBusy(true);
    setError(null);
    try {
      const token = tokens[tokens.length - 1] ?? "";
      const r = await cache.listKeys({ level: lvl, pattern: pat, pageSize: PAGE_SIZE, pageToken: token });
      setListing({ level: lvl, pattern: pat, keys: r.keys, tokens, next: r.nextPageToken });
    } catch (e) {
      setError(errorMessage(e));
    } finally {
      setBusy(false);
    }
  };
  const search = () => {
    setNotice(null);
    void list(level, pattern, [""]);
  };

  const view = async (lvl: CacheLevel, key: string) => {
    setError(null);
    try {
      const reply = await cache.get({ level: lvl, key });
      setViewed({ level: lvl, key, reply });
    } catch (e) {
      setError(errorMessage(e));
    }
  };

  const remove = async (lvl: CacheLevel, key: string) => {
    setError(null);
    try {
      const r = await cache.delete({ level: lvl, key });
      setNotice(r.deleted ? `deleted ${levelName(lvl)}/${key}` : `${levelName(lvl)}/${key} was already gone`);
      setListing((l) => (l ? { ...l, keys: l.keys.filter((k) => k !== key) } : l));
      setViewed((v) => (v && v.key === key && v.level === lvl ? null : v));
    } catch (e) {
      setError(errorMessage(e));
    }
  };

  const clear = async () => {
    setError(null);
    try {
      const r = await cache.clearLevel({ level });
      setNotice(`cleared level ${levelName(level)}: ${formatCount(r.deletedCount)} keys removed`);
      setViewed(null);
      if (listing && listing.level === level) await list(level, listing.pattern, [""]);
    } catch (e) {
      setError(errorMessage(e));
    }
  };

  return (
    <Card
      title="Keys"
      actions={
        caller.canAdmin && (
          <ConfirmButton
            write="admin"
            kind="danger"
            small
            testid="cache-clear"
            confirmLabel={`Remove every ${levelName(level)} key?`}
            onConfirm={clear}
          >
            Clear level {levelName(level)}
          </ConfirmButton>
        )
      }
    >
      <form
        class="row"
        onSubmit={(e) => {
          e.preventDefault();
          search();
        }}
      >
        <label class="field">
          level
          <select
            data-testid="cache-level"
            value={String(level)}
            onChange={(e) => setLevel(Number((e.target as HTMLSelectElement).value) as CacheLevel)}
          >
            {LEVELS.map((l) => (
              <option key={l} value={String(l)}>
                {levelName(l)}
              </option>
            ))}
          </select>
        </label>
        <label class="field">
          pattern
          <input
            data-testid="cache-pattern"
            value={pattern}
            spellcheck={false}
            placeholder="* ? [abc] (Redis MATCH)"
            onInput={(e) => setPattern((e.target as HTMLInputElement).value)}
          />
        </label>
        <button type="submit" class="btn primary small" data-testid="cache-search" disabled={busy}>
          List keys
        </button>
        {listing && (
          <span class="muted small" data-testid="cache-page-info">
            page {listing.tokens.length} of {levelName(listing.level)} matching <code>{listing.pattern || "*"}</code>:{" "}
            {listing.keys.length} keys{listing.next ? ", more on the next pages" : ""}
          </span>
        )}
      </form>
      <ErrorBanner error={error} testid="cache-error" />
      {notice && <Notice tone="ok">{notice}</Notice>}
      {listing && (
        <>
          <Table head={["key", ""]} empty="no keys on this page" testid="cache-keys-table">
            {listing.keys.map((k) => (
              <tr
                key={k}
                data-testid="cache-key-row"
                data-key={k}
                class={viewed && viewed.key === k && viewed.level === listing.level ? "sel" : ""}
              >
                <td class="mono">
                  <a
                    href="#/cache"
                    data-testid="cache-view"
                    onClick={(e) => {
                      e.preventDefault();
                      void view(listing.level, k);
                    }}
                  >
                    {k}
                  </a>
                </td>
                <td class="right nowrap">
                  <Button small onClick={() => view(listing.level, k)}>
                    View
                  </Button>{" "}
                  <Button small kind="danger" write="writer" testid="cache-delete" onClick={() => remove(listing.level, k)}>
                    Delete
                  </Button>
                </td>
              </tr>
            ))}
          </Table>
          <div class="row">
            <Button
              small
              testid="cache-prev"
              disabled={busy || listing.tokens.length <= 1}
              onClick={() => list(listing.level, listing.pattern, listing.tokens.slice(0, -1))}
            >
              ‹ Previous
            </Button>
            <Button
              small
              testid="cache-next"
              disabled={busy || !listing.next}
              onClick={() => list(listing.level, listing.pattern, [...listing.tokens, listing.next])}
            >
              Next ›
            </Button>
          </div>
        </>
      )}
      {viewed && <ValueView level={viewed.level} keyName={viewed.key} reply={viewed.reply} onDelete={remove} />}
    </Card>
  );
}

/** Bytes as hex, 16 to a line with their offset. */
function hexDump(bytes: Uint8Array): string {
  const lines: string[] = [];
  for (let i = 0; i < bytes.length; i += 16) {
    const row = bytes.subarray(i, i + 16);
    const hex = Array.from(row, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const ascii = Array.from(row, (b) => (b >= 0x20 && b < 0x7f ? String.fromCharCode(b) : ".")).join("");
    lines.push(`${i.toString(16).padStart(8, "0")}  ${hex.padEnd(47)}  ${ascii}`);
  }
  return lines.join("\n");
}

/** The value shown: text as is (pretty when it is JSON), JSON pretty, bytes as hex; cut at VIEW_LIMIT. */
function renderValue(reply: GetResponse): { kind: string; body: string; shown: number; total: number } {
  const kind = reply.value?.kind;
  if (!kind || kind.case === undefined) return { kind: "empty", body: "", shown: 0, total: 0 };
  if (kind.case === "raw") {
    const bytes = kind.value;
    const shown = Math.min(bytes.length, VIEW_LIMIT / 4);
    return { kind: "bytes", body: hexDump(bytes.subarray(0, shown)), shown, total: bytes.length };
  }
  let text: string;
  let label: string;
  if (kind.case === "json") {
    text = pretty(valueJson(kind.value));
    label = "JSON";
  } else {
    text = kind.value;
    label = "text";
    const t = text.trim();
    if (t.startsWith("{") || t.startsWith("[")) {
      try {
        text = pretty(JSON.parse(t));
        label = "text (JSON)";
      } catch {
        // not JSON: shown as it is
      }
    }
  }
  return { kind: label, body: text.slice(0, VIEW_LIMIT), shown: Math.min(text.length, VIEW_LIMIT), total: text.length };
}

function ValueView({
  level,
  keyName,
  reply,
  onDelete,
}: {
  level: CacheLevel;
  keyName: string;
  reply: GetResponse;
  onDelete: (level: CacheLevel, key: string) => Promise<void>;
}) {
  if (!reply.found) {
    return (
      <div class="stack" data-testid="cache-value">
        <h3>
          {levelName(level)}/<span class="mono">{keyName}</span>
        </h3>
        <Notice tone="warn">Not found: the key expired or was removed since it was listed.</Notice>
      </div>
    );
  }
  const v = renderValue(reply);
  return (
    <div class="stack" data-testid="cache-value" data-kind={v.kind}>
      <div class="row">
        <h3>
          {levelName(level)}/<span class="mono">{keyName}</span>
        </h3>
        <div class="spacer" />
        <Button small kind="danger" write="writer" onClick={() => onDelete(level, keyName)}>
          Delete
        </Button>
      </div>
      <dl class="kv">
        <dt>form</dt>
        <dd>{v.kind}</dd>
        <dt>size</dt>
        <dd>
          {formatBytes(reply.sizeBytes)} as set, {formatBytes(reply.storedSizeBytes)} stored
          {reply.compressed ? " (zlib)" : ""}
        </dd>
        <dt>expires</dt>
        <dd>{reply.ttl ? `in ${formatDuration(reply.ttl)}` : "never"}</dd>
      </dl>
      {v.shown < v.total && (
        <Notice tone="info">
          Showing the first {formatCount(v.shown)} of {formatCount(v.total)} {v.kind === "bytes" ? "bytes" : "characters"}.
        </Notice>
      )}
      <pre class="json" data-testid="cache-value-body">
        {v.body}
      </pre>
    </div>
  );
}

export function CacheView() {
  return (
    <div class="stack">
      <PageHead title="Cache" />
      <Metrics />
      <KeyBrowser />
    </div>
  );
}
