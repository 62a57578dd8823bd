// Turning koo's messages into text: state and category names, durations,
// times, counts and JSON values.
import { toJson, type JsonValue } from "@bufbuild/protobuf";
import { type Duration, type Timestamp, ValueSchema, type Value } from "@bufbuild/protobuf/wkt";
import { TaskCategory, TaskState } from "./gen/koo/tasks/v1/task_service_pb";

/** `RUNNING` for TaskState.RUNNING (the name without TASK_STATE_). */
export function stateName(s: TaskState): string {
  return TaskState[s] ?? "UNSPECIFIED";
}

export function categoryName(c: TaskCategory): string {
  return TaskCategory[c] ?? "UNSPECIFIED";
}

export const END_STATES = new Set<TaskState>([
  TaskState.SUCCEEDED,
  TaskState.FAILED,
  TaskState.CANCELLED,
  TaskState.TIMED_OUT,
]);

export function isEnded(s: TaskState): boolean {
  return END_STATES.has(s);
}

/** A CSS class for a state's colour. */
export function stateTone(s: TaskState): string {
  switch (s) {
    case TaskState.SUCCEEDED:
      return "good";
    case TaskState.FAILED:
    case TaskState.TIMED_OUT:
      return "bad";
    case TaskState.CANCELLED:
      return "muted";
    case TaskState.RUNNING:
      return "run";
    default:
      return "wait";
  }
}

export function durationMs(d: Duration | undefined): number | null {
  if (!d) return null;
  return Number(d.seconds) * 1000 + d.nanos / 1e6;
}

/** 850 ms, 12.3 s, 4m 05s, 2h 10m. */
export function formatMs(ms: number | null | undefined): string {
  if (ms == null || !Number.isFinite(ms)) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(h / 24)}d ${h % 24}h`;
}

export function formatDuration(d: Duration | undefined): string {
  return formatMs(durationMs(d));
}

export function tsMs(t: Timestamp | undefined): number | null {
  if (!t) return null;
  return Number(t.seconds) * 1000 + Math.floor(t.nanos / 1e6);
}

/** Local time, with the date when not today. */
export function formatTime(t: Timestamp | undefined): string {
  return formatTimeMs(tsMs(t));
}

export function formatTimeMs(ms: number | null): string {
  if (ms == null) return "–";
  const d = new Date(ms);
  const now = new Date();
  const time = d.toLocaleTimeString(undefined, { hour12: false });
  if (d.toDateString() === now.toDateString()) return time;
  return `${d.toLocaleDateString()} ${time}`;
}

/** "12 s ago" for a past time, "in 12 s" for a future one. */
export function formatAgo(t: Timestamp | undefined, now = Date.now()): string {
  return formatAgoMs(tsMs(t), now);
}

export function formatAgoMs(ms: number | null, now = Date.now()): string {
  if (ms == null) return "–";
  const diff = now - ms;
  return diff >= 0 ? `${formatMs(diff)} ago` : `in ${formatMs(-diff)}`;
}

export function formatCount(n: bigint | number | undefined): string {
  if (n === undefined) return "–";
  return Number(n).toLocaleString();
}

export function formatRate(perSecond: number | null): string {
  if (perSecond == null || !Number.isFinite(perSecond)) return "–";
  if (perSecond === 0) return "0/s";
  if (perSecond < 10) return `${perSecond.toFixed(2)}/s`;
  return `${Math.round(perSecond)}/s`;
}

export function valueJson(v: Value | undefined): JsonValue | undefined {
  return v ? toJson(ValueSchema, v) : undefined;
}

export function pretty(v: unknown): string {
  return JSON.stringify(v, null, 2) ?? "";
}
