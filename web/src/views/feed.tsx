// Tasks (in progress).
import { PageHead } from "../ui/components";

export function TaskFeedView() {
  return <PageHead title="Tasks" />;
}
