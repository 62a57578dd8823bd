// The live task feed (`#/tasks`): WatchTasks events (resumed with their token
// after a reconnect), newest task first, at most MAX_ROWS; it starts with the
// active tasks and recent history so the page is not empty. Category and name
// go to the RPCs (the name must match exactly: that is what they filter on);
// the state is filtered here.
import { Code } from "@connectrpc/connect";
import { useEffect, useMemo, useRef, useState } from "preact/hooks";
import { errorMessage, tasks, useKeyVersion, useStream } from "../api";
import { categoryName, formatAgoMs, formatTimeMs, isEnded, stateName, stateTone, tsMs } from "../format";
import {
  TaskCategory,
  TaskState,
  type Task,
  type TaskSummary,
  type WatchTasksResponse,
} from "../gen/koo/tasks/v1/task_service_pb";
import { Card, ErrorBanner, PageHead, Progress, Table } from "../ui/components";

const MAX_ROWS = 500;
/** Events kept while the feed is paused (beyond: the resume reloads). */
const BUFFERED = 5000;

export interface FeedRow {
  id: string;
  name: string;
  queue: string;
  category: TaskCategory;
  state: TaskState;
  percent: number | null;
  message: string;
  /** When the feed first had it (its submit, end or first event): the order. */
  since: number;
  /** Its latest event or report. */
  updated: number;
}

const CATEGORIES = Object.values(TaskCategory).filter(
  (v): v is TaskCategory => typeof v === "number" && v !== TaskCategory.UNSPECIFIED,
);
const STATES = Object.values(TaskState).filter(
  (v): v is TaskState => typeof v === "number" && v !== TaskState.UNSPECIFIED,
);

function fromTask(t: Task): FeedRow {
  const at = tsMs(t.endTime) ?? tsMs(t.startTime) ?? tsMs(t.createTime) ?? Date.now();
  return {
    id: t.id,
    name: t.name,
    queue: t.queue,
    category: t.category,
    state: t.state,
    percent: t.progress ? t.progress.percent : null,
    message: t.progress?.message ?? "",
    since: tsMs(t.createTime) ?? at,
    updated: at,
  };
}

function fromSummary(s: TaskSummary): FeedRow {
  const at = tsMs(s.endTime) ?? Date.now();
  return {
    id: s.id,
    name: s.name,
    queue: "",
    category: s.category,
    state: s.state,
    percent: null,
    message: "",
    since: at,
    updated: at,
  };
}

/** Keeps the newest MAX_ROWS rows by `since`. */
function capped(rows: Map<string, FeedRow>): Map<string, FeedRow> {
  if (rows.size <= MAX_ROWS) return rows;
  const keep = [...rows.values()].sort((a, b) => b.since - a.since).slice(0, MAX_ROWS);
  return new Map(keep.map((r) => [r.id, r]));
}

interface Filters {
  category: TaskCategory;
  name: string;
  state: TaskState;
}

/**
 * A filter value of a link: one of `all` by number (`3`) or by the name its
 * menu shows (`research`, `failed`); anything else is no filter (0), never
 * a NaN sent to koo.
 */
function pick<T extends number>(raw: string | null, all: readonly T[], name: (v: T) => string): T | 0 {
  if (!raw) return 0;
  const wanted = raw.trim().toLowerCase();
  return all.find((v) => String(v) === wanted || name(v).toLowerCase() === wanted) ?? 0;
}

function readFilters(): Filters {
  // The feed's filters live in the hash's query: #/tasks?category=3&name=x&state=4
  const q = new URLSearchParams(location.hash.split("?")[1] ?? "");
  return {
    category: pick(q.get("category"), CATEGORIES, categoryName) as TaskCategory,
    name: q.get("name") ?? "",
    state: pick(q.get("state"), STATES, stateName) as TaskState,
  };
}

export function TaskFeedView() {
  const [filters, setFilters] = useState<Filters>(readFilters);
  const [nameDraft, setNameDraft] = useState(filters.name);
  const [rows, setRows] = useState(new Map<string, FeedRow>());
  const [loadError, setLoadError] = useState<string | null>(null);
  const [paused, setPaused] = useState(false);
  const resume = useRef("");
  const kv = useKeyVersion();
  // Bumped to reload the lists (filters changed, or the resume token was too old).
  const [epoch, setEpoch] = useState(0);

  // Filters go into the hash, so a feed can be linked to and survives a reload.
  useEffect(() => {
    const q = new URLSearchParams();
    if (filters.category) q.set("category", String(filters.category));
    if (filters.name) q.set("name", filters.name);
    if (filters.state) q.set("state", String(filters.state));
    const qs = q.toString();
    const hash = `#/tasks${qs ? `?${qs}` : ""}`;
    if (location.hash !== hash) history.replaceState(null, "", hash);
  }, [filters]);

  // Start from the active tasks and the recent history.
  useEffect(() => {
    const ac = new AbortController();
    resume.current = "";
    setRows(new Map());
    (async () => {
      const { category, name, state } = filters;
      try {
        const wantActive = !state || !isEnded(state);
        const wantHistory = !state || isEnded(state);
        const [active, history] = await Promise.all([
          wantActive ? tasks.listActiveTasks({ category, name, pageSize: 200 }, { signal: ac.signal }) : null,
          wantHistory ? tasks.listTaskHistory({ category, name, state, pageSize: 200 }, { signal: ac.signal }) : null,
        ]);
        const initial = [...(active?.tasks.map(fromTask) ?? []), ...(history?.tasks.map(fromSummary) ?? [])];
        setRows((cur) => {
          const next = new Map(cur);
          // Events already received are newer than any list.
          for (const r of initial) if (!next.has(r.id)) next.set(r.id, r);
          return capped(next);
        });
        setLoadError(null);
      } catch (e) {
        if (!ac.signal.aborted) setLoadError(errorMessage(e));
      }
    })();
    return () => ac.abort();
  }, [filters.category, filters.name, filters.state, epoch, kv]);

  // While the feed is paused, events are kept (up to BUFFERED) and applied
  // on resume, so that no row stays in a state it has left; past the bound
  // the resume reloads the lists instead.
  const buffered = useRef<WatchTasksResponse[]>([]);
  const overflowed = useRef(false);
  const onEvent = (e: WatchTasksResponse) => {
    resume.current = e.resumeToken;
    if (paused) {
      if (buffered.current.length < BUFFERED) buffered.current.push(e);
      else overflowed.current = true;
      return;
    }
    apply(e);
  };
  const togglePause = () => {
    if (paused) {
      const kept = buffered.current;
      buffered.current = [];
      if (overflowed.current) {
        overflowed.current = false;
        setEpoch((n) => n + 1);
      } else {
        kept.forEach(apply);
      }
    }
    setPaused(!paused);
  };

  const apply = (e: WatchTasksResponse) => {
    const at = tsMs(e.eventTime) ?? Date.now();
    setRows((cur) => {
      const next = new Map(cur);
      const old = next.get(e.taskId);
      next.set(e.taskId, {
        id: e.taskId,
        name: e.name || old?.name || filters.name,
        queue: e.queue || old?.queue || "",
        category: old?.category ?? filters.category,
        state: e.state,
        percent: e.progress ? e.progress.percent : old?.percent ?? null,
        message: e.progress ? e.progress.message : old?.message ?? "",
        since: old?.since ?? at,
        updated: at,
      });
      return capped(next);
    });
  };

  const stream = useStream(
    (opts) =>
      tasks.watchTasks(
        {
          categories: filters.category ? [filters.category] : [],
          name: filters.name,
          resumeToken: resume.current,
        },
        opts,
      ),
    onEvent,
    [filters.category, filters.name, epoch],
    {
      onError: (e) => {
        // Too old to resume: start afresh from the lists.
        if (e.code === Code.OutOfRange) {
          resume.current = "";
          setEpoch((x) => x + 1);
        }
      },
    },
  );

  const shown = useMemo(
    () =>
      [...rows.values()]
        .filter((r) => !filters.state || r.state === filters.state)
        .sort((a, b) => b.since - a.since || (a.id < b.id ? 1 : -1)),
    [rows, filters.state],
  );

  return (
    <div>
      <PageHead title="Tasks">
        <label class="field">
          category
          <select
            data-testid="feed-category"
            value={String(filters.category)}
            onChange={(e) => setFilters({ ...filters, category: Number((e.target as HTMLSelectElement).value) as TaskCategory })}
          >
            <option value="0">all</option>
            {CATEGORIES.map((c) => (
              <option key={c} value={String(c)}>
                {categoryName(c).toLowerCase()}
              </option>
            ))}
          </select>
        </label>
        <label class="field" title="the exact task name (koo filters on it)">
          name
          <input
            data-testid="feed-name"
            placeholder="exact name, Enter"
            value={nameDraft}
            onInput={(e) => setNameDraft((e.target as HTMLInputElement).value)}
            onKeyDown={(e) => {
              if (e.key === "Enter") setFilters({ ...filters, name: nameDraft.trim() });
            }}
            onBlur={() => nameDraft.trim() !== filters.name && setFilters({ ...filters, name: nameDraft.trim() })}
          />
        </label>
        <label class="field">
          state
          <select
            data-testid="feed-state"
            value={String(filters.state)}
            onChange={(e) => setFilters({ ...filters, state: Number((e.target as HTMLSelectElement).value) as TaskState })}
          >
            <option value="0">all</option>
            {STATES.map((s) => (
              <option key={s} value={String(s)}>
                {stateName(s).toLowerCase()}
              </option>
            ))}
          </select>
        </label>
        <button type="button" class="btn small" data-testid="feed-pause" onClick={togglePause}>
          {paused ? "Resume feed" : "Pause feed"}
        </button>
      </PageHead>
      <ErrorBanner error={loadError} />
      <ErrorBanner error={stream.status !== "live" ? stream.error : null} />
      <Card class="flush">
        <Table
          testid="feed"
          head={["task", "name", "queue", "state", "progress", "updated", "first seen"]}
          empty={paused ? "paused" : "no tasks yet: they appear here as they are submitted"}
        >
          {shown.map((r) => (
            <tr key={r.id} data-testid="feed-row" data-task-id={r.id} data-state={stateName(r.state)}>
              <td class="id">
                <a href={`#/tasks/${encodeURIComponent(r.id)}`}>{r.id}</a>
              </td>
              <td class="mono">{r.name || <span class="muted">–</span>}</td>
              <td class="mono">{r.queue || (r.category ? categoryName(r.category).toLowerCase() : "")}</td>
              <td>
                <span class={`pill ${stateTone(r.state)}`}>{stateName(r.state)}</span>
              </td>
              <td class="progress-cell">
                {r.percent != null && !isEnded(r.state) ? (
                  <div class="row nowrap">
                    <Progress percent={r.percent} testid="feed-progress" />
                    <span class="small muted">
                      {Math.round(r.percent)}% {r.message}
                    </span>
                  </div>
                ) : (
                  <span class="small muted">{r.message}</span>
                )}
              </td>
              <td class="nowrap small" title={new Date(r.updated).toISOString()}>
                {formatTimeMs(r.updated)}
              </td>
              <td class="nowrap small muted">{formatAgoMs(r.since)}</td>
            </tr>
          ))}
        </Table>
        {shown.length >= MAX_ROWS && <div class="card-foot muted small">showing the newest {MAX_ROWS}</div>}
      </Card>
    </div>
  );
}
