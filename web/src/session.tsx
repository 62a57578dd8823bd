// Who the page acts as: the API key field (kept in sessionStorage), the caller
// koo names for it (GetCaller, asked on load and after each key change), and
// what that caller may do. Views ask `useCaller()` before they show a write
// button; any call that fails UNAUTHENTICATED brings up the key prompt.
import { Code } from "@connectrpc/connect";
import { createContext, type ComponentChildren } from "preact";
import { useContext, useEffect, useRef, useState } from "preact/hooks";
import { authn, connId, errorMessage, errorCode, getApiKey, onUnauthenticated, reportConn, setApiKey, useKeyVersion } from "./api";
import { Role } from "./gen/koo/auth/v1/auth_service_pb";

export interface Caller {
  /** The key's name, `anonymous` when koo runs open, "" before koo answered. */
  principal: string;
  /** READER, WRITER, ADMIN, WORKER, or "" before koo answered. */
  role: string;
  authRequired: boolean;
  /** May cancel, retry, delete cache keys (writer or admin). */
  canWrite: boolean;
  /** May requeue dead letters, clear levels, pause/resume/trigger schedules. */
  canAdmin: boolean;
  /** koo's version, when it said. */
  serverVersion: string;
}

interface Session {
  caller: Caller;
  /** True when koo wants a (different) key. */
  needKey: boolean;
  /** GetCaller's error other than UNAUTHENTICATED (koo unreachable, say). */
  error: string | null;
  /** koo's refusal of the key (or of no key), while needKey. */
  authError: string | null;
}

const NOBODY: Caller = {
  principal: "",
  role: "",
  authRequired: false,
  canWrite: false,
  canAdmin: false,
  serverVersion: "",
};

const SIGNED_OUT: Session = { caller: NOBODY, needKey: false, error: null, authError: null };

const SessionContext = createContext<Session>(SIGNED_OUT);

export function useCaller(): Caller {
  return useContext(SessionContext).caller;
}

export function useSession(): Session {
  return useContext(SessionContext);
}

function callerOf(role: Role, principal: string, authRequired: boolean, serverVersion: string): Caller {
  return {
    principal,
    role: Role[role] ?? "UNSPECIFIED",
    authRequired,
    canWrite: role === Role.WRITER || role === Role.ADMIN,
    canAdmin: role === Role.ADMIN,
    serverVersion,
  };
}

export function SessionProvider({ children }: { children: ComponentChildren }) {
  const [session, setSession] = useState<Session>(SIGNED_OUT);
  const kv = useKeyVersion();

  useEffect(
    () =>
      onUnauthenticated((e) =>
        setSession((s) =>
          s.needKey && s.authError ? s : { caller: NOBODY, needKey: true, error: null, authError: errorMessage(e) },
        ),
      ),
    [],
  );

  useEffect(() => {
    const ac = new AbortController();
    // GetCaller counts for the header's badge too (a view may have no stream).
    const id = connId();
    let timer: ReturnType<typeof setTimeout> | undefined;
    const ask = async () => {
      try {
        const r = await authn.getCaller({}, { signal: ac.signal });
        reportConn(id, "stopped");
        setSession({
          caller: callerOf(r.role, r.principal, r.authRequired, r.serverVersion),
          needKey: false,
          error: null,
          authError: null,
        });
      } catch (e) {
        if (ac.signal.aborted) return;
        const code = errorCode(e);
        reportConn(id, code === Code.Unimplemented || code === Code.Unauthenticated ? "stopped" : "reconnecting");
        if (code === Code.Unimplemented) {
          // A koo without AuthService runs open: everyone is an admin.
          setSession({ ...SIGNED_OUT, caller: callerOf(Role.ADMIN, "anonymous", false, "") });
        } else if (code === Code.Unauthenticated) {
          setSession({ ...SIGNED_OUT, needKey: true, authError: errorMessage(e) });
        } else {
          setSession((s) => ({ ...s, error: errorMessage(e) }));
          // koo unreachable: ask again shortly, so the buttons come back with it.
          timer = setTimeout(ask, 3000);
        }
      }
    };
    void ask();
    return () => {
      ac.abort();
      clearTimeout(timer);
      reportConn(id, null);
    };
  }, [kv]);

  return <SessionContext.Provider value={session}>{children}</SessionContext.Provider>;
}

/** The header's key field: Enter or Save stores it; shows who koo takes us for. */
export function KeyField() {
  const { caller, needKey } = useSession();
  const [draft, setDraft] = useState(getApiKey());
  const input = useRef<HTMLInputElement>(null);
  useEffect(() => {
    if (needKey) input.current?.focus();
  }, [needKey]);
  const save = () => setApiKey(draft);
  return (
    <div class={needKey ? "keyfield need" : "keyfield"}>
      <input
        ref={input}
        type="password"
        autocomplete="off"
        spellcheck={false}
        placeholder={needKey ? "API key required" : "API key"}
        aria-label="API key"
        data-testid="api-key-input"
        value={draft}
        onInput={(e) => setDraft((e.target as HTMLInputElement).value)}
        onKeyDown={(e) => {
          if (e.key === "Enter") save();
        }}
      />
      <button type="button" class="btn small" data-testid="api-key-save" onClick={save}>
        Save
      </button>
      <span class="caller" data-testid="caller" title={caller.serverVersion ? `koo ${caller.serverVersion}` : ""}>
        {caller.principal ? (
          <>
            {caller.principal} <span class={`role role-${caller.role.toLowerCase()}`}>{caller.role.toLowerCase()}</span>
          </>
        ) : needKey ? (
          "no key"
        ) : (
          "…"
        )}
      </span>
    </div>
  );
}
