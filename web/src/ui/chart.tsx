// A live line chart over uPlot: a `Rolling` window holds the last N samples of
// several series; pushing a sample redraws every chart showing it (without a
// re-render of the view). The chart follows its container's width, and its
// container says how many samples it has been given (`data-samples`), so that
// tests can see it move.
import uPlot from "uplot";
import "uplot/dist/uPlot.min.css";
import { useEffect, useMemo, useRef } from "preact/hooks";

/** The last `max` samples of `series` series, x in seconds since the epoch. */
export class Rolling {
  readonly xs: number[] = [];
  readonly ys: (number | null)[][];
  /** Samples pushed since creation (not capped by the window). */
  pushed = 0;
  private listeners = new Set<() => void>();

  constructor(
    readonly series: number,
    readonly max: number,
  ) {
    this.ys = Array.from({ length: series }, () => []);
  }

  push(tSeconds: number, values: (number | null | undefined)[]): void {
    this.xs.push(tSeconds);
    for (let i = 0; i < this.series; i++) this.ys[i].push(values[i] ?? null);
    if (this.xs.length > this.max) {
      this.xs.shift();
      for (const y of this.ys) y.shift();
    }
    this.pushed++;
    this.listeners.forEach((l) => l());
  }

  data(): uPlot.AlignedData {
    return [this.xs.slice(), ...this.ys.map((y) => y.slice())] as uPlot.AlignedData;
  }

  subscribe(l: () => void): () => void {
    this.listeners.add(l);
    return () => void this.listeners.delete(l);
  }
}

/** A Rolling kept for the component's life (a new one when `key` changes). */
export function useRolling(series: number, max = 120, key: unknown = null): Rolling {
  // eslint-disable-next-line react-hooks/exhaustive-deps
  return useMemo(() => new Rolling(series, max), [series, max, key]);
}

export interface SeriesSpec {
  label: string;
  /** A CSS color; by default one of the palette's. */
  color?: string;
}

export const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"];

function cssVar(name: string, fallback: string): string {
  const v = getComputedStyle(document.documentElement).getPropertyValue(name).trim();
  return v || fallback;
}

/** 16:38:05 for seconds since the epoch. */
function clock(x: number): string {
  const d = new Date(x * 1000);
  const p = (n: number) => String(n).padStart(2, "0");
  return `${p(d.getHours())}:${p(d.getMinutes())}:${p(d.getSeconds())}`;
}

export function Chart({
  rolling,
  series,
  testid,
  height = 160,
  unit = "",
  decimals = 2,
  span,
}: {
  rolling: Rolling;
  series: SeriesSpec[];
  testid?: string;
  height?: number;
  /** Appended to values in the legend, e.g. "/s" or " ms". */
  unit?: string;
  decimals?: number;
  /** Show the last this many seconds (the x axis does not stretch while the window fills). */
  span?: number;
}) {
  const box = useRef<HTMLDivElement>(null);

  useEffect(() => {
    const el = box.current;
    if (!el) return;
    const axisColor = cssVar("--muted", "#6b7280");
    const gridColor = cssVar("--grid", "rgba(128,128,128,0.15)");
    const fmt = (v: number | null) => (v == null ? "–" : `${Number(v.toFixed(decimals))}${unit}`);
    const opts: uPlot.Options = {
      width: Math.max(200, el.clientWidth),
      height,
      legend: { live: true },
      cursor: { drag: { x: false, y: false } },
      scales: {
        // At most `span` seconds back; while fewer samples exist, the ones there fill the width.
        x: {
          time: true,
          range: span ? (_u, min, max) => (min < max ? [Math.max(min, max - span), max] : [max - 1, max]) : undefined,
        },
        y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] },
      },
      axes: [
        {
          stroke: axisColor,
          grid: { stroke: gridColor, width: 1 },
          ticks: { stroke: gridColor, width: 1 },
          space: 70,
          // Whole seconds at least: samples come a second apart.
          incrs: [1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600],
          values: (_u, splits) => splits.map((x) => clock(x)),
        },
        {
          stroke: axisColor,
          grid: { stroke: gridColor, width: 1 },
          ticks: { stroke: gridColor, width: 1 },
          size: 48,
        },
      ],
      series: [
        {},
        ...series.map((s, i) => ({
          label: s.label,
          stroke: s.color ?? PALETTE[i % PALETTE.length],
          width: 1.5,
          points: { show: false },
          value: (_u: uPlot, v: number | null) => fmt(v),
        })),
      ],
    };
    const u = new uPlot(opts, rolling.data(), el);
    el.dataset.samples = String(rolling.pushed);
    const off = rolling.subscribe(() => {
      u.setData(rolling.data());
      el.dataset.samples = String(rolling.pushed);
    });
    const ro = new ResizeObserver(() => {
      const w = Math.max(200, el.clientWidth);
      if (w !== u.width) u.setSize({ width: w, height });
    });
    ro.observe(el);
    return () => {
      off();
      ro.disconnect();
      u.destroy();
    };
    // The series' labels define the chart: a change builds a new one.
    // eslint-disable-next-line react-hooks/exhaustive-deps
  }, [rolling, height, span, series.map((s) => s.label).join("\n")]);

  return <div class="chart" ref={box} data-testid={testid} data-samples="0" />;
}
