// Workers (`#/workers`): koo's built-in pools and the external workers, with
// what each serves and holds (ListWorkers, every page, polled every 3 s: there
// is no stream of workers), and the live summary of WatchTaskMetrics.
import { useState } from "preact/hooks";
import { tasks, usePoll, useStream, workers } from "../api";
import { formatAgo, formatTime } from "../format";
import type { WorkerMetrics } from "../gen/koo/tasks/v1/task_service_pb";
import { WorkerKind, type Worker } from "../gen/koo/worker/v1/worker_service_pb";
import { Chart, useRolling } from "../ui/chart";
import { Card, ErrorBanner, PageHead, Progress, Stat, Stats, Table } from "../ui/components";

const POLL_MS = 3000;
const KIND: Record<WorkerKind, string> = {
  [WorkerKind.UNSPECIFIED]: "?",
  [WorkerKind.BUILTIN]: "builtin",
  [WorkerKind.STREAM]: "stream",
  [WorkerKind.UNARY]: "unary",
};

async function listAll(opts: { signal?: AbortSignal }): Promise<Worker[]> {
  const out: Worker[] = [];
  let pageToken = "";
  // A few pages at most: koo caps a page at 1000.
  for (let i = 0; i < 10; i++) {
    const r = await workers.listWorkers({ pageSize: 1000, pageToken }, opts);
    out.push(...r.workers);
    pageToken = r.nextPageToken;
    if (!pageToken) break;
  }
  return out;
}

export function WorkersView() {
  const poll = usePoll(listAll, POLL_MS, []);
  const [summary, setSummary] = useState<WorkerMetrics | null>(null);
  const busy = useRolling(2, 180);
  const stream = useStream(
    (opts) => tasks.watchTaskMetrics({}, opts),
    (m) => {
      if (m.workers) {
        setSummary(m.workers);
        busy.push((Number(m.time?.seconds ?? 0n) * 1000 + (m.time?.nanos ?? 0) / 1e6) / 1000 || Date.now() / 1000, [
          m.workers.busy,
          m.workers.slots,
        ]);
      }
    },
    [],
  );

  const list = [...(poll.data ?? [])].sort(
    (a, b) => a.kind - b.kind || (a.name || a.id).localeCompare(b.name || b.id),
  );

  return (
    <div>
      <PageHead title="Workers" />
      <ErrorBanner error={poll.error} />
      <ErrorBanner error={stream.status !== "live" ? stream.error : null} />
      <div class="grid">
        <Card title="Now">
          <Stats>
            <Stat label="live workers" value={summary ? String(summary.live) : "–"} testid="workers-live" />
            <Stat label="external" value={summary ? String(summary.external) : "–"} />
            <Stat label="busy slots" value={summary ? `${summary.busy}/${summary.slots}` : "–"} testid="workers-busy" />
            <Stat
              label="utilisation"
              value={summary && summary.slots > 0 ? `${Math.round((100 * summary.busy) / summary.slots)}%` : "–"}
            />
          </Stats>
        </Card>
        <Card title="Busy slots">
          <Chart
            rolling={busy}
            series={[{ label: "busy" }, { label: "slots", color: "#9ca3af" }]}
            testid="chart-workers"
            decimals={0}
            span={180}
            height={120}
          />
        </Card>
      </div>
      <Card title="Workers" class="flush">
        <Table
          testid="workers-table"
          head={["kind", "worker", "queues", "task names", "holds", "tasks held", "peer", "started", "last seen"]}
          empty={poll.data ? "no live workers" : "loading…"}
        >
          {list.map((w) => (
            <tr key={w.id} data-testid="worker-row" data-worker-id={w.id} data-kind={KIND[w.kind]}>
              <td>
                <span class={`pill ${w.kind === WorkerKind.BUILTIN ? "muted" : "run"}`}>{KIND[w.kind] ?? "?"}</span>
              </td>
              <td>
                <div class="mono">{w.name || w.id}</div>
                {w.name && <div class="mono small muted">{w.id}</div>}
              </td>
              <td class="mono small">{w.queues.join(", ") || "all"}</td>
              <td class="mono small">{w.taskNames.length ? w.taskNames.join(", ") : <span class="muted">all of its queues</span>}</td>
              <td class="nowrap">
                <div class="row">
                  <Progress percent={w.concurrency > 0 ? (100 * w.running) / w.concurrency : 0} />
                  <span class="small">
                    {w.running}/{w.concurrency}
                  </span>
                </div>
              </td>
              <td class="small">
                {w.taskIds.map((id) => (
                  <div key={id}>
                    <a class="mono" href={`#/tasks/${encodeURIComponent(id)}`}>
                      {id}
                    </a>
                  </div>
                ))}
              </td>
              <td class="mono small">{w.peer}</td>
              <td class="nowrap small">{formatTime(w.startTime)}</td>
              <td class="nowrap small">{formatAgo(w.lastSeenTime)}</td>
            </tr>
          ))}
        </Table>
      </Card>
    </div>
  );
}
