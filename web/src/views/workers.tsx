// Workers (in progress).
import { PageHead } from "../ui/components";

export function WorkersView() {
  return <PageHead title="Workers" />;
}
