// The schedules page: ListSchedules polled every 5 s (schedules have no
// stream): cron, task, next fire times, last run (linked to its task), paused
// state, and pause / resume / trigger for admins.
import { useState } from "preact/hooks";
import { errorMessage, schedules, usePoll } from "../api";
import { Button, Card, ErrorBanner, Notice, PageHead, Table } from "../ui/components";
import { categoryName, formatAgo, formatTime, stateName, stateTone } from "../format";
import { MissedTickPolicy, ScheduleSource, type Schedule } from "../gen/koo/schedule/v1/schedule_service_pb";
import { TaskState } from "../gen/koo/tasks/v1/task_service_pb";

const POLL_MS = 5000;
/** Pages of 1000 read per poll at most (a list longer than that is cut, with a note). */
const MAX_PAGES = 5;

async function listAll(signal: AbortSignal): Promise<{ schedules: Schedule[]; cut: boolean }> {
  const out: Schedule[] = [];
  let token = "";
  for (let i = 0; i < MAX_PAGES; i++) {
    const r = await schedules.listSchedules({ pageSize: 1000, pageToken: token }, { signal });
    out.push(...r.schedules);
    token = r.nextPageToken;
    if (!token) return { schedules: out, cut: false };
  }
  return { schedules: out, cut: true };
}

function sourceName(s: ScheduleSource): string {
  return s === ScheduleSource.CONFIG ? "config" : s === ScheduleSource.API ? "api" : "";
}

function NextFires({ s }: { s: Schedule }) {
  if (s.paused) return <span class="muted">paused</span>;
  const [first, ...rest] = s.nextFireTimes;
  if (!first) return <span class="muted">–</span>;
  return (
    <span data-testid="schedule-next" title={rest.map((t) => formatTime(t)).join("\n")}>
      {formatTime(first)} <span class="muted small">({formatAgo(first)})</span>
      {rest.length > 0 && (
        <div class="muted small">then {rest.slice(0, 2).map((t) => formatTime(t)).join(", ")}{rest.length > 2 ? ", …" : ""}</div>
      )}
    </span>
  );
}

function LastRun({ s }: { s: Schedule }) {
  const run = s.lastRun;
  if (!run || !run.taskId) return <span class="muted">never</span>;
  const state = run.state === TaskState.UNSPECIFIED ? "EXPIRED" : stateName(run.state);
  return (
    <span data-testid="schedule-last-run">
      <a href={`#/tasks/${encodeURIComponent(run.taskId)}`} class="id" data-testid="schedule-last-task">
        {run.taskId}
      </a>{" "}
      <span class={`pill ${run.state === TaskState.UNSPECIFIED ? "muted" : stateTone(run.state)}`}>{state}</span>
      <div class="muted small">
        {run.triggered ? "triggered" : `tick ${formatTime(run.tickTime)}`}
        {run.endTime ? `, ended ${formatAgo(run.endTime)}` : ""}
      </div>
      {run.error && <div class="small muted">error: {run.error}</div>}
    </span>
  );
}

export function SchedulesView() {
  const poll = usePoll((o) => listAll(o.signal!), POLL_MS, []);
  const [error, setError] = useState<string | null>(null);
  const [notice, setNotice] = useState<{ text: string; taskId?: string } | null>(null);

  const act = async (what: string, name: string, call: () => Promise<unknown>) => {
    setError(null);
    setNotice(null);
    try {
      const r = await call();
      const taskId = (r as { task?: { id?: string } }).task?.id;
      setNotice({ text: `${what} ${name}`, taskId });
    } catch (e) {
      setError(`${what} ${name}: ${errorMessage(e)}`);
    }
    poll.refresh();
  };

  const list = poll.data?.schedules ?? [];
  return (
    <div class="stack">
      <PageHead title="Schedules">
        <span class="muted small">refreshed every {POLL_MS / 1000} s</span>
      </PageHead>
      <ErrorBanner error={poll.error} testid="schedules-error" />
      <ErrorBanner error={error} testid="schedule-action-error" />
      {notice && (
        <Notice tone="ok">
          {notice.text}
          {notice.taskId && (
            <>
              : task{" "}
              <a href={`#/tasks/${encodeURIComponent(notice.taskId)}`} class="id">
                {notice.taskId}
              </a>
            </>
          )}
        </Notice>
      )}
      {poll.data?.cut && <Notice tone="warn">Showing the first {list.length} schedules.</Notice>}
      <Card class="flush">
        <Table
          testid="schedules-table"
          head={["name", "cron", "task", "next fire (local time)", "last run", "state", ""]}
          empty={poll.data ? "no schedules" : "loading…"}
        >
          {list.map((s) => (
            <tr key={s.name} data-testid="schedule-row" data-name={s.name} data-paused={s.paused ? "true" : "false"}>
              <td title={s.updateTime ? `changed ${formatTime(s.updateTime)}` : undefined}>
                <strong>{s.name}</strong>
                {sourceName(s.source) && <div class="muted small">from {sourceName(s.source)}</div>}
              </td>
              <td class="nowrap">
                <code>{s.cron}</code>
                <div class="muted small">
                  {s.timeZone || "UTC"}
                  {s.missedTickPolicy === MissedTickPolicy.RUN_ONCE ? ", runs a missed tick once" : ""}
                </div>
              </td>
              <td>
                <code>{s.task?.name ?? "–"}</code>
                {s.task && (
                  <div class="muted small">
                    {categoryName(s.task.category).toLowerCase()}
                    {s.task.queue ? ` → ${s.task.queue}` : ""}
                  </div>
                )}
              </td>
              <td>
                <NextFires s={s} />
              </td>
              <td>
                <LastRun s={s} />
              </td>
              <td>
                <span class={`pill ${s.paused ? "muted" : "good"}`} data-testid="schedule-state">
                  {s.paused ? "paused" : "active"}
                </span>
              </td>
              <td class="right nowrap">
                {s.paused ? (
                  <Button
                    small
                    write="admin"
                    testid="schedule-resume"
                    onClick={() => act("resumed", s.name, () => schedules.resumeSchedule({ name: s.name }))}
                  >
                    Resume
                  </Button>
                ) : (
                  <Button
                    small
                    write="admin"
                    testid="schedule-pause"
                    onClick={() => act("paused", s.name, () => schedules.pauseSchedule({ name: s.name }))}
                  >
                    Pause
                  </Button>
                )}{" "}
                <Button
                  small
                  kind="primary"
                  write="admin"
                  testid="schedule-trigger"
                  onClick={() => act("triggered", s.name, () => schedules.triggerSchedule({ name: s.name }))}
                >
                  Trigger
                </Button>
              </td>
            </tr>
          ))}
        </Table>
      </Card>
    </div>
  );
}
