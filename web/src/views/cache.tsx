// The cache view (owned by web-b): hit ratio and latency per level, memory,
// compression, the key browser.
import { PageHead } from "../ui/components";

export function CacheView() {
  return <PageHead title="Cache" />;
}
