// One task (in progress).
import { PageHead } from "../ui/components";

export function TaskView({ id }: { id: string }) {
  return <PageHead title={`Task ${id}`} />;
}
