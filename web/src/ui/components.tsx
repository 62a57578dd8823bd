// The dashboard's shared pieces: layout and nav, cards, stats, tables,
// buttons (plain, confirming, write-gated), the error banner and the
// connection badge. Styles live in ui/app.css (no inline style markup: koo's
// Content-Security-Policy forbids it).
import type { ComponentChildren } from "preact";
import { useEffect, useState } from "preact/hooks";
import { useOverallConn } from "../api";
import { KeyField, useSession } from "../session";

export interface NavItem {
  route: string;
  label: string;
}

export const NAV: NavItem[] = [
  { route: "queues", label: "Queues" },
  { route: "workers", label: "Workers" },
  { route: "tasks", label: "Tasks" },
  { route: "dead", label: "Dead letters" },
  { route: "schedules", label: "Schedules" },
  { route: "cache", label: "Cache" },
];

export function Layout({ route, children }: { route: string; children: ComponentChildren }) {
  const { needKey, error, authError } = useSession();
  return (
    <div class="app">
      <header class="top">
        <a class="brand" href="#/queues">
          koo
        </a>
        <nav class="nav">
          {NAV.map((n) => (
            <a
              key={n.route}
              href={`#/${n.route}`}
              class={route === n.route ? "active" : ""}
              data-testid={`nav-${n.route}`}
              aria-current={route === n.route ? "page" : undefined}
            >
              {n.label}
            </a>
          ))}
        </nav>
        <div class="spacer" />
        <ConnBadge />
        <KeyField />
      </header>
      {needKey && (
        <div class="banner warn" data-testid="key-prompt" role="alert">
          koo requires an API key: enter one above (it stays in this tab only).
          {authError && <div class="small" data-testid="key-error">{authError}</div>}
        </div>
      )}
      {error && !needKey && <ErrorBanner error={`koo is not answering: ${error}`} />}
      <main class="main">{children}</main>
    </div>
  );
}

/** `live`, `reconnecting` or `refused` (or `connecting` before the first stream opens). */
export function ConnBadge() {
  const s = useOverallConn();
  return (
    <span class={`badge conn-${s}`} data-testid="conn-status" title="the page's streams to koo">
      {s}
    </span>
  );
}

export function Card({
  title,
  actions,
  children,
  class: cls,
  testid,
}: {
  title?: ComponentChildren;
  actions?: ComponentChildren;
  children: ComponentChildren;
  class?: string;
  testid?: string;
}) {
  return (
    <section class={`card ${cls ?? ""}`} data-testid={testid}>
      {(title || actions) && (
        <div class="card-head">
          {title && <h2>{title}</h2>}
          {actions && <div class="card-actions">{actions}</div>}
        </div>
      )}
      <div class="card-body">{children}</div>
    </section>
  );
}

export function Stat({
  label,
  value,
  hint,
  tone,
  testid,
}: {
  label: string;
  value: ComponentChildren;
  hint?: string;
  tone?: "good" | "bad" | "warn" | "muted";
  testid?: string;
}) {
  return (
    <div class={`stat ${tone ?? ""}`} title={hint} data-testid={testid}>
      <div class="stat-value">{value}</div>
      <div class="stat-label">{label}</div>
    </div>
  );
}

export function Stats({ children }: { children: ComponentChildren }) {
  return <div class="stats">{children}</div>;
}

/** A dense table; `empty` is shown as one row when there are no rows. */
export function Table({
  head,
  children,
  empty,
  testid,
}: {
  head: ComponentChildren[];
  children: ComponentChildren;
  empty?: ComponentChildren;
  testid?: string;
}) {
  const rows = Array.isArray(children) ? children.flat().filter(Boolean) : children ? [children] : [];
  return (
    <div class="table-wrap">
      <table class="table" data-testid={testid}>
        <thead>
          <tr>
            {head.map((h, i) => (
              <th key={i}>{h}</th>
            ))}
          </tr>
        </thead>
        <tbody>
          {rows.length === 0 && empty !== undefined ? (
            <tr class="empty">
              <td colSpan={head.length}>{empty}</td>
            </tr>
          ) : (
            children
          )}
        </tbody>
      </table>
    </div>
  );
}

type ButtonProps = {
  onClick?: () => unknown;
  kind?: "primary" | "danger" | "plain";
  small?: boolean;
  /** Marks a button that writes: shown only to callers of that role. */
  write?: "writer" | "admin";
  testid?: string;
  disabled?: boolean;
  title?: string;
  children: ComponentChildren;
};

/**
 * A button; with `write`, rendered only when the caller has that role, and
 * marked `data-write`. An onClick returning a promise disables it meanwhile.
 */
export function Button({ onClick, kind, small, write, testid, disabled, title, children }: ButtonProps) {
  const allowed = useWriteAllowed(write);
  const [busy, setBusy] = useState(false);
  if (!allowed) return null;
  const click = async () => {
    const r = onClick?.();
    if (r instanceof Promise) {
      setBusy(true);
      try {
        await r;
      } finally {
        setBusy(false);
      }
    }
  };
  return (
    <button
      type="button"
      class={`btn ${kind ?? "plain"} ${small ? "small" : ""}`}
      data-write={write}
      data-testid={testid}
      disabled={disabled || busy}
      title={title}
      onClick={click}
    >
      {children}
    </button>
  );
}

function useWriteAllowed(write?: "writer" | "admin"): boolean {
  const { caller } = useSession();
  if (write === "writer") return caller.canWrite;
  if (write === "admin") return caller.canAdmin;
  return true;
}

/**
 * A button that asks first: the first click arms it ("Confirm?"), a second
 * click within 5 s runs `onConfirm`; otherwise it disarms.
 */
export function ConfirmButton({
  onConfirm,
  kind,
  small,
  write,
  testid,
  confirmLabel,
  disabled,
  title,
  children,
}: Omit<ButtonProps, "onClick"> & { onConfirm: () => unknown; confirmLabel?: string }) {
  const allowed = useWriteAllowed(write);
  const [armed, setArmed] = useState(false);
  const [busy, setBusy] = useState(false);
  useEffect(() => {
    if (!armed) return;
    const t = setTimeout(() => setArmed(false), 5000);
    return () => clearTimeout(t);
  }, [armed]);
  if (!allowed) return null;
  const click = async () => {
    if (!armed) {
      setArmed(true);
      return;
    }
    setArmed(false);
    const r = onConfirm();
    if (r instanceof Promise) {
      setBusy(true);
      try {
        await r;
      } finally {
        setBusy(false);
      }
    }
  };
  return (
    <button
      type="button"
      class={`btn ${armed ? "danger armed" : kind ?? "plain"} ${small ? "small" : ""}`}
      data-write={write}
      data-testid={testid}
      data-armed={armed ? "true" : "false"}
      disabled={disabled || busy}
      title={title}
      onClick={click}
    >
      {armed ? confirmLabel ?? "Click again to confirm" : children}
    </button>
  );
}

export function ErrorBanner({ error, testid }: { error: string | null | undefined; testid?: string }) {
  if (!error) return null;
  return (
    <div class="banner error" role="alert" data-testid={testid ?? "error-banner"}>
      {error}
    </div>
  );
}

export function Notice({ children, tone }: { children: ComponentChildren; tone?: "info" | "warn" | "ok" }) {
  return <div class={`banner ${tone ?? "info"}`}>{children}</div>;
}

/** A view's heading row: title, an optional stream state, and actions. */
export function PageHead({ title, children }: { title: string; children?: ComponentChildren }) {
  return (
    <div class="page-head">
      <h1>{title}</h1>
      <div class="page-actions">{children}</div>
    </div>
  );
}

/** A horizontal progress bar (0 to 100). */
export function Progress({ percent, testid }: { percent: number; testid?: string }) {
  const p = Math.max(0, Math.min(100, Number.isFinite(percent) ? percent : 0));
  return (
    <div class="progress" data-testid={testid} data-percent={String(Math.round(p))} role="progressbar" aria-valuenow={Math.round(p)} aria-valuemin={0} aria-valuemax={100}>
      <ProgressFill percent={p} />
    </div>
  );
}

// The fill's width is set through the CSSOM (allowed by the CSP), not a style attribute.
function ProgressFill({ percent }: { percent: number }) {
  return (
    <div
      class="progress-fill"
      ref={(el) => {
        if (el) el.style.width = `${percent}%`;
      }}
    />
  );
}
