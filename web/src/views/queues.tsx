// Queues (in progress).
import { PageHead } from "../ui/components";

export function QueuesView() {
  return <PageHead title="Queues" />;
}
