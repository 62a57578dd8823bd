// Dead letters (in progress).
import { PageHead } from "../ui/components";

export function DeadView() {
  return <PageHead title="Dead letters" />;
}
