// One task (`#/tasks/<id>`), live from WatchTask: state, a progress bar and
// message, arguments, the attempt log, the result or the error with its
// details; Cancel while it has not ended, Retry once it failed, timed out or
// was cancelled.
import { useRef, useState } from "preact/hooks";
import { errorMessage, tasks, useStream } from "../api";
import {
  categoryName,
  formatAgo,
  formatDuration,
  formatTime,
  isEnded,
  pretty,
  stateName,
  stateTone,
  valueJson,
} from "../format";
import { TaskPriority, TaskState, type Task } from "../gen/koo/tasks/v1/task_service_pb";
import { CacheLevel } from "../gen/koo/cache/v1/cache_service_pb";
import { Button, Card, ErrorBanner, Notice, PageHead, Progress, Table } from "../ui/components";

const RETRYABLE = new Set([TaskState.FAILED, TaskState.TIMED_OUT, TaskState.CANCELLED]);

export function TaskView({ id }: { id: string }) {
  const [task, setTask] = useState<Task | null>(null);
  const [actionError, setActionError] = useState<string | null>(null);
  const [notice, setNotice] = useState<string | null>(null);
  // Bumped after a retry: the watch ended with the task, so start it again.
  const [run, setRun] = useState(0);
  const ended = useRef(false);

  const stream = useStream(
    (opts) => tasks.watchTask({ taskId: id }, opts),
    (m) => {
      if (m.task) {
        ended.current = isEnded(m.task.state);
        setTask(m.task);
      }
    },
    [id, run],
    // The stream ends after the final state: that is the end, not a drop.
    { finished: () => ended.current },
  );

  const cancel = async () => {
    setActionError(null);
    setNotice(null);
    try {
      const r = await tasks.cancelTask({ taskId: id });
      // The watch may have brought the end already: a RUNNING reply is older.
      const after = r.task;
      if (after) setTask((cur) => (cur && isEnded(cur.state) ? cur : after));
      setNotice(r.task?.state === TaskState.RUNNING ? "cancel requested: its worker is stopping it" : "cancelled");
    } catch (e) {
      setActionError(errorMessage(e));
    }
  };
  const retry = async () => {
    setActionError(null);
    setNotice(null);
    try {
      const r = await tasks.retryTask({ taskId: id });
      if (r.task) setTask(r.task);
      setNotice("queued again");
      ended.current = false;
      setRun((x) => x + 1);
    } catch (e) {
      setActionError(errorMessage(e));
    }
  };

  const t = task;
  return (
    <div>
      <PageHead title="Task">
        <span class="id mono">{id}</span>
        {t && (
          <span class={`pill big ${stateTone(t.state)}`} data-testid="task-state">
            {stateName(t.state)}
          </span>
        )}
        {t && !isEnded(t.state) && (
          <Button write="writer" kind="danger" testid="task-cancel" onClick={cancel}>
            Cancel
          </Button>
        )}
        {t && RETRYABLE.has(t.state) && (
          <Button write="writer" kind="primary" testid="task-retry" onClick={retry}>
            Retry
          </Button>
        )}
      </PageHead>
      <ErrorBanner error={actionError} testid="action-error" />
      {notice && !(t && isEnded(t.state) && notice.startsWith("cancel requested")) && <Notice tone="ok">{notice}</Notice>}
      <ErrorBanner error={stream.error && (stream.status !== "live" || !t) ? stream.error : null} testid="task-error" />
      {!t && !stream.error && <p class="muted">loading…</p>}
      {t && <TaskBody t={t} />}
    </div>
  );
}

function TaskBody({ t }: { t: Task }) {
  const percent = t.progress?.percent ?? (t.state === TaskState.SUCCEEDED ? 100 : 0);
  const args = t.args.map((v) => valueJson(v));
  return (
    <div>
      <div class="grid">
        <Card title="Task">
          <dl class="kv">
            <dt>name</dt>
            <dd class="mono" data-testid="task-name">
              {t.name}
            </dd>
            <dt>category</dt>
            <dd>{categoryName(t.category).toLowerCase()}</dd>
            <dt>queue</dt>
            <dd class="mono">{t.queue}</dd>
            <dt>priority</dt>
            <dd>{(TaskPriority[t.priority] ?? "NORMAL").toLowerCase()}</dd>
            <dt>attempts</dt>
            <dd>
              {t.attempts} of {t.maxRetries + 1}
            </dd>
            {t.worker && (
              <>
                <dt>worker</dt>
                <dd class="mono">{t.worker}</dd>
              </>
            )}
            <dt>submitted</dt>
            <dd>
              {formatTime(t.createTime)} <span class="muted">({formatAgo(t.createTime)})</span>
            </dd>
            {t.startTime && (
              <>
                <dt>started</dt>
                <dd>{formatTime(t.startTime)}</dd>
              </>
            )}
            {t.endTime && (
              <>
                <dt>ended</dt>
                <dd>{formatTime(t.endTime)}</dd>
              </>
            )}
            <dt>time limits</dt>
            <dd>
              soft {formatDuration(t.softTimeLimit)}, hard {formatDuration(t.timeLimit)}
            </dd>
            {t.expireTime && (
              <>
                <dt>expires</dt>
                <dd data-testid="task-expires">
                  {formatTime(t.expireTime)} <span class="muted">(not started by then, it ends CANCELLED)</span>
                </dd>
              </>
            )}
            {t.debounceKey && (
              <>
                <dt>debounce key</dt>
                <dd class="mono" data-testid="task-debounce-key">
                  {t.debounceKey}
                </dd>
              </>
            )}
            {t.schedule && (
              <>
                <dt>schedule</dt>
                <dd>
                  <a href="#/schedules">{t.schedule}</a>
                  {t.scheduleTime && <span class="muted"> (tick {formatTime(t.scheduleTime)})</span>}
                </dd>
              </>
            )}
            {t.dependsOn.length > 0 && (
              <>
                <dt>depends on</dt>
                <dd>
                  {t.dependsOn.map((d) => (
                    <div key={d}>
                      <a class="mono" href={`#/tasks/${encodeURIComponent(d)}`}>
                        {d}
                      </a>
                    </div>
                  ))}
                </dd>
              </>
            )}
            {t.cacheResult && (
              <>
                <dt>result cached</dt>
                <dd class="mono">
                  {(CacheLevel[t.cacheResult.level] ?? "APP").toLowerCase()}:{t.cacheResult.key}
                </dd>
              </>
            )}
            {t.traceParent && (
              <>
                <dt>trace</dt>
                <dd class="mono small">{t.traceParent}</dd>
              </>
            )}
          </dl>
        </Card>
        <Card title="Progress">
          <Progress percent={percent} testid="task-progress" />
          <div class="row progress-text">
            <strong data-testid="task-percent">{Math.round(percent)}%</strong>
            <span data-testid="task-message">{t.progress?.message ?? ""}</span>
          </div>
          {t.progress?.metadata && Object.keys(t.progress.metadata).length > 0 && (
            <pre class="json">{pretty(t.progress.metadata)}</pre>
          )}
          {t.state === TaskState.SUCCEEDED && (
            <>
              <h3>Result</h3>
              <pre class="json" data-testid="task-result">
                {pretty(valueJson(t.result) ?? null)}
              </pre>
            </>
          )}
          {t.error && (t.error.message || t.error.details) && (
            <>
              <h3>{isEnded(t.state) ? "Error" : "Latest error"}</h3>
              <div class="banner error" data-testid="task-failure">
                {t.error.message}
                {t.error.retryable ? " (retryable)" : ""}
              </div>
              {t.error.details && Object.keys(t.error.details).length > 0 && (
                <pre class="json">{pretty(t.error.details)}</pre>
              )}
            </>
          )}
        </Card>
      </div>
      <div class="grid">
        <Card title="Arguments">
          <h3>args</h3>
          <pre class="json" data-testid="task-args">
            {pretty(args)}
          </pre>
          <h3>kwargs</h3>
          <pre class="json" data-testid="task-kwargs">
            {pretty(t.kwargs ?? {})}
          </pre>
        </Card>
        <Card title="Attempt log" class="flush">
          <Table testid="task-attempts" head={["#", "outcome", "worker", "ended", "error", "retry at"]} empty="no attempt ended yet">
            {t.attemptLog.map((a) => (
              <tr key={a.attempt} data-testid="attempt-row">
                <td class="num">{a.attempt}</td>
                <td>
                  <span class={`pill ${a.outcome === "succeeded" ? "good" : a.outcome === "lost" ? "muted" : "bad"}`}>
                    {a.outcome}
                  </span>
                </td>
                <td class="mono small">{a.worker}</td>
                <td class="nowrap">{formatTime(a.endTime)}</td>
                <td>{a.error}</td>
                <td class="nowrap">{a.retryTime ? formatTime(a.retryTime) : ""}</td>
              </tr>
            ))}
          </Table>
        </Card>
      </div>
    </div>
  );
}
