// The dashboard's entry: hash routes (the page may sit behind a path prefix,
// so no history API paths), the session (API key and caller) around every
// view, and the layout.
import { render } from "preact";
import { useEffect, useState } from "preact/hooks";
import "./ui/app.css";
import { SessionProvider } from "./session";
import { Layout } from "./ui/components";
import { CacheView } from "./views/cache";
import { DeadView } from "./views/dead";
import { QueuesView } from "./views/queues";
import { SchedulesView } from "./views/schedules";
import { TaskFeedView } from "./views/feed";
import { TaskView } from "./views/task";
import { WorkersView } from "./views/workers";

interface Route {
  /** The nav entry it belongs to. */
  name: string;
  /** The rest of the path, e.g. a task id. */
  arg: string;
}

export function parseHash(hash: string): Route {
  // A view's own parameters follow a "?" (the feed's filters).
  const path = hash.replace(/^#\/?/, "").split("?")[0];
  const [name, ...rest] = path.split("/");
  const arg = rest.length ? decodeURIComponent(rest.join("/")) : "";
  switch (name) {
    case "workers":
    case "tasks":
    case "dead":
    case "schedules":
    case "cache":
    case "queues":
      return { name, arg };
    default:
      return { name: "queues", arg: "" };
  }
}

function useHash(): Route {
  const [route, setRoute] = useState(parseHash(location.hash));
  useEffect(() => {
    const on = () => setRoute(parseHash(location.hash));
    addEventListener("hashchange", on);
    return () => removeEventListener("hashchange", on);
  }, []);
  return route;
}

function View({ route }: { route: Route }) {
  switch (route.name) {
    case "workers":
      return <WorkersView />;
    case "tasks":
      return route.arg ? <TaskView key={route.arg} id={route.arg} /> : <TaskFeedView />;
    case "dead":
      return <DeadView />;
    case "schedules":
      return <SchedulesView />;
    case "cache":
      return <CacheView />;
    default:
      return <QueuesView />;
  }
}

function App() {
  const route = useHash();
  useEffect(() => {
    document.title = `koo · ${route.name}${route.arg ? ` ${route.arg}` : ""}`;
  }, [route.name, route.arg]);
  return (
    <SessionProvider>
      <Layout route={route.name}>
        <View route={route} />
      </Layout>
    </SessionProvider>
  );
}

render(<App />, document.getElementById("app")!);
