// Dead letters (`#/dead`): FAILED and TIMED_OUT tasks from ListTaskHistory
// (one call per state: it filters on one), polled every few seconds and again
// when WatchTasks reports such an end; requeue one or all
// (RequeueDeadLetters, admin).
import { useRef, useState } from "preact/hooks";
import { errorMessage, tasks, usePoll, useStream } from "../api";
import { categoryName, formatAgo, formatDuration, formatTime, stateName, stateTone, tsMs } from "../format";
import { TaskState, type TaskSummary } from "../gen/koo/tasks/v1/task_service_pb";
import { Button, Card, ConfirmButton, ErrorBanner, Notice, PageHead, Table } from "../ui/components";

const PAGE = 200;
const POLL_MS = 5000;

export function DeadView() {
  const [actionError, setActionError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  // Requeued entries (id -> the end time listed), hidden until that task ends again.
  const [gone, setGone] = useState(new Map<string, number | null>());

  const poll = usePoll(
    async (opts) => {
      const [failed, timedOut] = await Promise.all([
        tasks.listTaskHistory({ state: TaskState.FAILED, pageSize: PAGE }, opts),
        tasks.listTaskHistory({ state: TaskState.TIMED_OUT, pageSize: PAGE }, opts),
      ]);
      const all = [...failed.tasks, ...timedOut.tasks].sort(
        (a, b) => (tsMs(b.endTime) ?? 0) - (tsMs(a.endTime) ?? 0),
      );
      return { tasks: all, more: failed.nextPageToken !== "" || timedOut.nextPageToken !== "" };
    },
    POLL_MS,
    [],
  );

  // A new dead letter: list again now (at most once a second), not at the next poll.
  const last = useRef(0);
  useStream(
    (opts) => tasks.watchTasks({}, opts),
    (e) => {
      if ((e.state === TaskState.FAILED || e.state === TaskState.TIMED_OUT) && Date.now() - last.current > 1000) {
        last.current = Date.now();
        poll.refresh();
      }
    },
    [],
  );

  const requeue = async (ids: string[] | "all") => {
    setActionError(null);
    setNotice(null);
    try {
      const r = await tasks.requeueDeadLetters(ids === "all" ? { all: true } : { taskIds: ids });
      setNotice(`queued again: ${r.taskIds.length} task${r.taskIds.length === 1 ? "" : "s"}`);
      const ended = new Map((poll.data?.tasks ?? []).map((t) => [t.id, tsMs(t.endTime)]));
      setGone((g) => new Map([...g, ...r.taskIds.map((id): [string, number | null] => [id, ended.get(id) ?? null])]));
      poll.refresh();
    } catch (e) {
      setActionError(errorMessage(e));
    }
  };

  // A requeued task leaves history's dead states only when it ends again: hide it meanwhile.
  const rows: TaskSummary[] = (poll.data?.tasks ?? []).filter(
    (t) => !gone.has(t.id) || gone.get(t.id) !== tsMs(t.endTime),
  );

  return (
    <div>
      <PageHead title="Dead letters">
        <span class="muted small">{poll.data ? `${rows.length}${poll.data.more ? "+" : ""} failed or timed out` : ""}</span>
        <ConfirmButton
          write="admin"
          kind="danger"
          testid="dead-requeue-all"
          confirmLabel="Requeue every dead letter?"
          disabled={rows.length === 0}
          onConfirm={() => requeue("all")}
        >
          Requeue all
        </ConfirmButton>
      </PageHead>
      <ErrorBanner error={actionError} testid="action-error" />
      {notice && <Notice tone="ok">{notice}</Notice>}
      <ErrorBanner error={poll.error} />
      <Card class="flush">
        <Table
          testid="dead-table"
          head={["task", "name", "category", "state", "attempts", "ended", "ran", "schedule", ""]}
          empty={poll.data ? "no dead letters" : "loading…"}
        >
          {rows.map((t) => (
            <tr key={t.id} data-testid="dead-row" data-task-id={t.id} data-state={stateName(t.state)}>
              <td class="id">
                <a href={`#/tasks/${encodeURIComponent(t.id)}`}>{t.id}</a>
              </td>
              <td class="mono">{t.name}</td>
              <td>{categoryName(t.category).toLowerCase()}</td>
              <td>
                <span class={`pill ${stateTone(t.state)}`}>{stateName(t.state)}</span>
              </td>
              <td class="num">{t.attempts}</td>
              <td class="nowrap" title={formatAgo(t.endTime)}>
                {formatTime(t.endTime)}
              </td>
              <td class="num">{t.runDuration ? formatDuration(t.runDuration) : "–"}</td>
              <td>{t.schedule}</td>
              <td class="right">
                <Button write="admin" small testid="dead-requeue" onClick={() => requeue([t.id])}>
                  Requeue
                </Button>
              </td>
            </tr>
          ))}
        </Table>
        {poll.data?.more && (
          <div class="card-foot muted small">
            showing the newest {PAGE} of each state; “Requeue all” takes every dead letter (up to 1000 per queue per call)
          </div>
        )}
      </Card>
    </div>
  );
}
