// Queues (`#/queues`): every queue's depth, running, scheduled, pending, dead
// letters and oldest wait, live from WatchTaskMetrics; throughput and outcome
// rates (from the counters' deltas between snapshots) and depths as live
// charts, for all queues or the one selected; run and wait times where koo
// has them. Admins pause and resume a queue (PauseQueue, ResumeQueue); the
// state column follows the stream's `paused`.
import { useRef, useState } from "preact/hooks";
import { errorMessage, tasks, useStream } from "../api";
import { durationMs, formatCount, formatDuration, formatMs, formatRate, tsMs } from "../format";
import {
  TaskCategory,
  type DurationStats,
  type QueueMetrics,
  type WatchTaskMetricsResponse,
} from "../gen/koo/tasks/v1/task_service_pb";
import { Chart, Rolling, type SeriesSpec } from "../ui/chart";
import { Button, Card, ErrorBanner, PageHead, Stat, Stats, Table } from "../ui/components";

const ALL = "";

/** The categories' own queues, for a link to the feed filtered on that category. */
const CATEGORY_OF_QUEUE: Record<string, TaskCategory> = {
  ai_service: TaskCategory.AI_SERVICE,
  pdf_processing: TaskCategory.PDF_PROCESSING,
  database: TaskCategory.DATABASE,
  health_check: TaskCategory.HEALTH_CHECK,
  research: TaskCategory.RESEARCH,
  cache: TaskCategory.CACHE,
};
const WINDOW = 180; // samples (one a second)

/** The counters a rate is computed from. */
const COUNTERS = ["submitted", "succeeded", "failed", "retried", "timed_out", "lost"] as const;
type Counter = (typeof COUNTERS)[number];

function counter(q: QueueMetrics, c: Counter): number {
  switch (c) {
    case "submitted":
      return Number(q.submitted);
    case "succeeded":
      return Number(q.succeeded);
    case "failed":
      return Number(q.failed);
    case "retried":
      return Number(q.retried);
    case "timed_out":
      return Number(q.timedOut);
    case "lost":
      return Number(q.lost);
  }
}

const THROUGHPUT: SeriesSpec[] = [
  { label: "submitted/s", color: "#2563eb" },
  { label: "succeeded/s", color: "#16a34a" },
];
const OUTCOMES: SeriesSpec[] = [
  { label: "succeeded", color: "#16a34a" },
  { label: "failed", color: "#dc2626" },
  { label: "retried", color: "#d97706" },
  { label: "timed out", color: "#7c3aed" },
  { label: "lost", color: "#6b7280" },
];
const DEPTHS: SeriesSpec[] = [
  { label: "queued", color: "#2563eb" },
  { label: "running", color: "#0891b2" },
  { label: "scheduled", color: "#7c3aed" },
  { label: "pending", color: "#d97706" },
];

/** Rolling windows of one queue (or of all). */
interface QueueSeries {
  throughput: Rolling;
  outcomes: Rolling;
  depths: Rolling;
}

function newSeries(): QueueSeries {
  return {
    throughput: new Rolling(THROUGHPUT.length, WINDOW),
    outcomes: new Rolling(OUTCOMES.length, WINDOW),
    depths: new Rolling(DEPTHS.length, WINDOW),
  };
}

/** Sums the queues' figures into one, for "all queues". */
function total(queues: QueueMetrics[]): Record<Counter | "queued" | "running" | "scheduled" | "pending" | "dead", number> {
  const t = { submitted: 0, succeeded: 0, failed: 0, retried: 0, timed_out: 0, lost: 0, queued: 0, running: 0, scheduled: 0, pending: 0, dead: 0 };
  for (const q of queues) {
    for (const c of COUNTERS) t[c] += counter(q, c);
    t.queued += Number(q.queued);
    t.running += Number(q.running);
    t.scheduled += Number(q.scheduled);
    t.pending += Number(q.pending);
    t.dead += Number(q.deadLetters);
  }
  return t;
}

export function QueuesView() {
  const [snap, setSnap] = useState<WatchTaskMetricsResponse | null>(null);
  const [selected, setSelected] = useState<string>(ALL);
  const series = useRef(new Map<string, QueueSeries>());
  const prev = useRef<{ t: number; counts: Map<string, Record<string, number>> } | null>(null);
  // Rates per queue of the latest snapshot, for the table.
  const [rates, setRates] = useState(new Map<string, Record<Counter, number>>());
  const [actionError, setActionError] = useState<string | null>(null);
  // The state a pause or resume just set, until the next snapshot shows it.
  const [pending, setPending] = useState(new Map<string, boolean>());

  const setPaused = async (queue: string, paused: boolean) => {
    setActionError(null);
    try {
      const r = paused
        ? await tasks.pauseQueue({ queue, reason: "paused from the dashboard" })
        : await tasks.resumeQueue({ queue });
      setPending((p) => new Map(p).set(queue, r.queue?.metrics?.paused ?? paused));
    } catch (e) {
      setActionError(errorMessage(e));
    }
  };

  const stream = useStream(
    (opts) => tasks.watchTaskMetrics({}, opts),
    (m) => {
      const t = (tsMs(m.time) ?? Date.now()) / 1000;
      const counts = new Map<string, Record<string, number>>();
      for (const q of m.queues) counts.set(q.queue, total([q]));
      counts.set(ALL, total(m.queues));
      const p = prev.current;
      const newRates = new Map<string, Record<Counter, number>>();
      for (const [key, c] of counts) {
        let s = series.current.get(key);
        if (!s) {
          s = newSeries();
          series.current.set(key, s);
        }
        const before = p?.counts.get(key);
        const dt = p ? t - p.t : 0;
        s.depths.push(t, [c.queued, c.running, c.scheduled, c.pending]);
        if (before && dt > 0) {
          // A counter that went down (koo's store reset) gives no rate, not a negative one.
          const rate = (k: Counter) => (c[k] >= before[k] ? (c[k] - before[k]) / dt : null);
          const r = Object.fromEntries(COUNTERS.map((k) => [k, rate(k) ?? 0])) as Record<Counter, number>;
          newRates.set(key, r);
          s.throughput.push(t, [rate("submitted"), rate("succeeded")]);
          s.outcomes.push(t, [rate("succeeded"), rate("failed"), rate("retried"), rate("timed_out"), rate("lost")]);
        }
      }
      prev.current = { t, counts };
      setRates(newRates);
      // a click's state holds until a snapshot shows it (one read before
      // the click would flip the pill back for a second)
      setPending((p) => {
        const left = new Map(p);
        for (const q of m.queues) if (left.get(q.queue) === q.paused) left.delete(q.queue);
        return left.size === p.size ? p : left;
      });
      setSnap(m);
    },
    [],
  );

  const queues = snap?.queues ?? [];
  // Before the first snapshot (or while koo refuses the stream) nothing is
  // known: the figures read "–", not 0.
  const all: Partial<ReturnType<typeof total>> = snap ? total(queues) : {};
  const oldest = queues.reduce<number | null>((mx, q) => {
    const w = durationMs(q.oldestWait);
    return w != null && (mx == null || w > mx) ? w : mx;
  }, null);
  const shown = series.current.get(selected) ?? series.current.get(ALL);
  const selLabel = selected === ALL ? "all queues" : `queue ${selected}`;

  return (
    <div>
      <PageHead title="Queues">
        <span class="muted small">
          {snap ? `updated ${new Date((tsMs(snap.time) ?? 0)).toLocaleTimeString(undefined, { hour12: false })}` : ""}
        </span>
      </PageHead>
      <ErrorBanner error={stream.status !== "live" ? stream.error : actionError} />

      <Card>
        <Stats>
          <Stat label="queued" value={formatCount(all.queued)} testid="stat-queued" />
          <Stat label="running" value={formatCount(all.running)} testid="stat-running" />
          <Stat label="scheduled" value={formatCount(all.scheduled)} />
          <Stat label="pending" value={formatCount(all.pending)} />
          <Stat label="dead letters" value={formatCount(all.dead)} tone={(all.dead ?? 0) > 0 ? "bad" : undefined} />
          <Stat label="oldest wait" value={formatMs(oldest)} tone={oldest != null && oldest > 60_000 ? "warn" : undefined} />
          <Stat
            label="workers busy"
            value={snap?.workers ? `${snap.workers.busy}/${snap.workers.slots}` : "–"}
            hint={snap?.workers ? `${snap.workers.live} live, ${snap.workers.external} external` : ""}
          />
          <Stat label="submitted/s" value={formatRate(rates.get(ALL)?.submitted ?? null)} />
        </Stats>
      </Card>

      <Card
        title="Queues"
        class="flush"
        actions={<span class="muted small">click a row to chart that queue</span>}
      >
        <Table
          testid="queues-table"
          head={["queue", "state", "queued", "running", "scheduled", "pending", "dead", "oldest wait", "in/s", "done/s", "submitted", "succeeded", "failed", "run p50 / p95", "wait p50 / p95"]}
          empty={snap ? "no queues" : "waiting for koo…"}
        >
          {queues.map((q) => {
            const r = rates.get(q.queue);
            const paused = pending.get(q.queue) ?? q.paused;
            return (
              <tr
                key={q.queue}
                data-testid="queue-row"
                data-queue={q.queue}
                data-paused={paused ? "true" : "false"}
                class={selected === q.queue ? "sel" : ""}
                onClick={() => setSelected(selected === q.queue ? ALL : q.queue)}
              >
                <td class="mono">
                  {q.queue}
                  {CATEGORY_OF_QUEUE[q.queue] && (
                    <a
                      class="small row-link"
                      href={`#/tasks?category=${CATEGORY_OF_QUEUE[q.queue]}`}
                      title="its tasks in the feed"
                      onClick={(e) => e.stopPropagation()}
                    >
                      tasks
                    </a>
                  )}
                </td>
                <td class="nowrap" onClick={(e) => e.stopPropagation()}>
                  <span class={`pill ${paused ? "wait" : "good"}`} data-testid="queue-state">
                    {paused ? "paused" : "running"}
                  </span>{" "}
                  {paused ? (
                    <Button small write="admin" testid="queue-resume" title="hand out this queue's tasks again" onClick={() => setPaused(q.queue, false)}>
                      Resume
                    </Button>
                  ) : (
                    <Button small write="admin" testid="queue-pause" title="hand out nothing from this queue (submits are still accepted; running tasks finish)" onClick={() => setPaused(q.queue, true)}>
                      Pause
                    </Button>
                  )}
                </td>
                <td class="num">{formatCount(q.queued)}</td>
                <td class="num">{formatCount(q.running)}</td>
                <td class="num">{formatCount(q.scheduled)}</td>
                <td class="num">{formatCount(q.pending)}</td>
                <td class="num">{q.deadLetters > 0n ? <a href="#/dead">{formatCount(q.deadLetters)}</a> : "0"}</td>
                <td class="num">{q.oldestWait ? formatDuration(q.oldestWait) : "–"}</td>
                <td class="num">{formatRate(r?.submitted ?? null)}</td>
                <td class="num">{formatRate(r?.succeeded ?? null)}</td>
                <td class="num">{formatCount(q.submitted)}</td>
                <td class="num">{formatCount(q.succeeded)}</td>
                <td class="num">{formatCount(q.failed)}</td>
                <td class="num nowrap">{pair(q.runTime)}</td>
                <td class="num nowrap">{pair(q.waitTime)}</td>
              </tr>
            );
          })}
        </Table>
        <div class="card-foot placeholder small" data-testid="flow-control-placeholder">
          A paused queue accepts submits and hands out nothing until resumed. Rate limits per queue: <code>koo limit set-rate queues/&lt;queue&gt;</code> or <code>KOO_RATE_LIMITS</code> (README, "Rate limits").
        </div>
      </Card>

      <div class="grid">
        <Card
          title={`Throughput · ${selLabel}`}
          actions={
            <select
              aria-label="queue to chart"
              data-testid="chart-queue"
              value={selected}
              onChange={(e) => setSelected((e.target as HTMLSelectElement).value)}
            >
              <option value={ALL}>all queues</option>
              {queues.map((q) => (
                <option key={q.queue} value={q.queue}>
                  {q.queue}
                </option>
              ))}
            </select>
          }
        >
          {shown && <Chart key={`t-${selected}`} rolling={shown.throughput} series={THROUGHPUT} testid="chart-throughput" unit="/s" span={WINDOW} />}
        </Card>
        <Card title={`Outcomes per second · ${selLabel}`}>
          {shown && <Chart key={`o-${selected}`} rolling={shown.outcomes} series={OUTCOMES} testid="chart-outcomes" unit="/s" span={WINDOW} />}
        </Card>
        <Card title={`Depth · ${selLabel}`}>
          {shown && <Chart key={`d-${selected}`} rolling={shown.depths} series={DEPTHS} testid="chart-depth" decimals={0} span={WINDOW} />}
        </Card>
      </div>
      <TimesCard queues={queues} selected={selected} window={snap?.timesWindow ? formatDuration(snap.timesWindow) : ""} />
    </div>
  );
}

function pair(s: DurationStats | undefined): string {
  if (!s || s.count === 0n) return "–";
  return `${formatDuration(s.p50)} / ${formatDuration(s.p95)}`;
}

/** Run and wait times of the selected queue (or each queue), by task name. */
function TimesCard({ queues, selected, window }: { queues: QueueMetrics[]; selected: string; window: string }) {
  const rows: { queue: string; name: string; run?: DurationStats; wait?: DurationStats }[] = [];
  for (const q of queues) {
    if (selected !== ALL && q.queue !== selected) continue;
    if (q.byName.length === 0) {
      if (q.runTime || q.waitTime) rows.push({ queue: q.queue, name: "(all)", run: q.runTime, wait: q.waitTime });
      continue;
    }
    for (const n of q.byName) rows.push({ queue: q.queue, name: n.name, run: n.runTime, wait: n.waitTime });
  }
  return (
    <Card title={`Run and wait times${window ? ` · last ${window}` : ""}`} class="flush">
      <Table
        head={["queue", "task", "runs", "run p50", "p95", "p99", "max", "wait p50", "p95"]}
        empty="no attempt ended in the window"
      >
        {rows.map((r) => (
          <tr key={`${r.queue}/${r.name}`}>
            <td class="mono">{r.queue}</td>
            <td class="mono">{r.name}</td>
            <td class="num">{formatCount(r.run?.count ?? 0n)}</td>
            <td class="num">{formatDuration(r.run?.p50)}</td>
            <td class="num">{formatDuration(r.run?.p95)}</td>
            <td class="num">{formatDuration(r.run?.p99)}</td>
            <td class="num">{formatDuration(r.run?.max)}</td>
            <td class="num">{formatDuration(r.wait?.p50)}</td>
            <td class="num">{formatDuration(r.wait?.p95)}</td>
          </tr>
        ))}
      </Table>
    </Card>
  );
}
