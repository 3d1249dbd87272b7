//! The report's charts, each an SVG document drawn with plotters' SVG
//! backend. Text is left to the browser (`<text>` elements, plotters'
//! naive font metrics for layout): no font files are read.

use super::{
    history::Record,
    input::{is_peer, Latency, Run, TimelinePhase},
    targets::{fmt_value, target_of, Target, Verdict},
};
use crate::report::fmt_rate;
use anyhow::{anyhow, Result};
use plotters::{
    coord::Shift,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

/// Every chart is this wide (the page scales it down to fit).
const WIDTH: u32 = 1100;
/// Room for the names left of a chart's rows.
const LABEL_W: u32 = 330;
/// Ratio keys drawn in a history chart; further keys are left out (the
/// page says so).
pub const HISTORY_KEYS_MAX: usize = 48;
/// Points per history chart: the newest records of the benchmark.
pub const HISTORY_POINTS_MAX: usize = 50;

const FONT: &str = "sans-serif";
const PASS: RGBColor = RGBColor(46, 125, 50);
const FAIL: RGBColor = RGBColor(198, 40, 40);
const NEUTRAL: RGBColor = RGBColor(84, 110, 122);
const GREY: RGBColor = RGBColor(117, 117, 117);
const LIGHT: RGBColor = RGBColor(224, 224, 224);
/// Lines and bars of ours (blues and greens) and of the peer (oranges and
/// browns), so ours stands beside the peer at a glance.
const OURS: [RGBColor; 4] = [
    RGBColor(21, 101, 192),
    RGBColor(0, 137, 123),
    RGBColor(94, 53, 177),
    RGBColor(2, 136, 209),
];
const PEER: [RGBColor; 4] = [
    RGBColor(239, 108, 0),
    RGBColor(141, 110, 99),
    RGBColor(249, 168, 37),
    RGBColor(216, 67, 21),
];
/// Shades of a latency bar, p50 lightest to max darkest.
const OURS_SHADES: [RGBColor; 4] = [
    RGBColor(144, 202, 249),
    RGBColor(66, 165, 245),
    RGBColor(21, 101, 192),
    RGBColor(13, 71, 161),
];
const PEER_SHADES: [RGBColor; 4] = [
    RGBColor(255, 204, 128),
    RGBColor(255, 167, 38),
    RGBColor(239, 108, 0),
    RGBColor(191, 54, 12),
];

type Area<'a> = DrawingArea<SVGBackend<'a>, Shift>;
type Drawn = Result<(), Box<dyn std::error::Error>>;

/// Draw on a white `size` canvas; the SVG document.
fn svg(size: (u32, u32), draw: impl FnOnce(&Area) -> Drawn) -> Result<String> {
    let mut buf = String::new();
    {
        let root = SVGBackend::with_string(&mut buf, size).into_drawing_area();
        root.fill(&WHITE)
            .map_err(|e| anyhow!("draw a chart: {e}"))?;
        draw(&root).map_err(|e| anyhow!("draw a chart: {e}"))?;
        root.present().map_err(|e| anyhow!("draw a chart: {e}"))?;
    }
    Ok(buf)
}

fn verdict_colour(v: Verdict) -> RGBColor {
    match v {
        Verdict::Pass => PASS,
        Verdict::Fail => FAIL,
        Verdict::NoTarget | Verdict::NoValue => NEUTRAL,
    }
}

fn font(size: u32, colour: RGBColor) -> TextStyle<'static> {
    (FONT, size).into_font().color(&colour)
}

/// A short axis label.
fn fmt_axis(v: f64) -> String {
    if v.abs() >= 1000.0 {
        fmt_rate(v)
    } else if v == v.trunc() {
        format!("{v:.0}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    }
}

fn fmt_us(us: f64) -> String {
    if us >= 1e6 {
        format!("{:.1} s", us / 1e6)
    } else if us >= 1e3 {
        format!("{:.1} ms", us / 1e3)
    } else {
        format!("{us:.0} us")
    }
}

/// The x range of a ratio row: 0, the value and the target, with room.
fn ratio_range(value: Option<f64>, target: Option<&Target>) -> (f64, f64) {
    let vals = [Some(0.0), value, target.map(|t| t.value)];
    let lo = vals.iter().flatten().fold(0.0f64, |a, &b| a.min(b));
    let hi = vals.iter().flatten().fold(0.0f64, |a, &b| a.max(b));
    if hi - lo < 1e-12 {
        (lo, lo + 1.0)
    } else {
        (
            lo - (hi - lo) * 0.02 * f64::from(lo < 0.0),
            hi + (hi - lo) * 0.15,
        )
    }
}

/// One row per ratio of `run`: a bar (and a marker) at its value, coloured
/// pass / fail / no target, and its target as a dashed line.
pub fn ratios_chart(run: &Run) -> Result<String> {
    const ROW_H: u32 = 54;
    const VALUE_W: u32 = 230;
    let n = run.ratios.len().max(1);
    let height = n as u32 * ROW_H + 10;
    svg((WIDTH, height), |root| {
        let rows = root.margin(5, 5, 5, 5).split_evenly((n, 1));
        for ((key, value), row) in run.ratios.iter().zip(rows) {
            let target = target_of(&run.bench, key);
            let verdict = Verdict::of(target, *value);
            let colour = verdict_colour(verdict);
            let (label, rest) = row.split_horizontally(LABEL_W);
            let (w, _) = rest.dim_in_pixel();
            let (plot, value_area) = rest.split_horizontally(w.saturating_sub(VALUE_W));
            label.draw(&Text::new(
                key.as_str(),
                (4, 8),
                font(15, RGBColor(0, 0, 0)),
            ))?;
            if let Some(t) = target {
                label.draw(&Text::new(t.what, (4, 28), font(11, GREY)))?;
            }
            let (lo, hi) = ratio_range(*value, target);
            let mut chart = ChartBuilder::on(&plot)
                .margin_top(4)
                .margin_right(12)
                .x_label_area_size(18)
                .build_cartesian_2d(lo..hi, 0f64..1f64)?;
            chart
                .configure_mesh()
                .disable_mesh()
                .y_labels(0)
                .x_labels(6)
                .x_label_formatter(&|v| fmt_axis(*v))
                .label_style(font(10, GREY))
                .axis_style(LIGHT)
                .draw()?;
            if let Some(v) = *value {
                chart.draw_series([Rectangle::new(
                    [(v.min(0.0), 0.2), (v.max(0.0), 0.8)],
                    colour.mix(0.8).filled(),
                )])?;
                chart.draw_series([Circle::new((v, 0.5), 5, colour.filled())])?;
            }
            if let Some(t) = target {
                chart.draw_series(DashedLineSeries::new(
                    [(t.value, 0.0), (t.value, 1.0)],
                    4,
                    3,
                    BLACK.stroke_width(2),
                ))?;
            }
            let text = match (value, target) {
                (Some(v), Some(t)) => {
                    format!("{}  (target {t})  {}", fmt_value(*v), verdict.label())
                }
                (Some(v), None) => format!("{}  (no target)", fmt_value(*v)),
                (None, Some(t)) => format!("no value  (target {t})"),
                (None, None) => "no value".to_owned(),
            };
            value_area.draw(&Text::new(text, (6, 12), font(14, colour)))?;
        }
        Ok(())
    })
}

/// Ours and the peer's throughput over one phase: a line per series.
pub fn timeline_chart(phase: &TimelinePhase) -> Result<String> {
    let points = phase.series.iter().flat_map(|(_, p)| p.iter());
    let t_max = points.clone().map(|p| p.0).fold(0.0f64, f64::max).max(0.1);
    let y_max = points.map(|p| p.1).fold(0.0f64, f64::max).max(1.0) * 1.12;
    const LEGEND_W: u32 = 250;
    svg((WIDTH, 320), |root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .margin_right(LEGEND_W)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..t_max, 0f64..y_max)?;
        chart
            .configure_mesh()
            .light_line_style(RGBColor(245, 245, 245))
            .bold_line_style(LIGHT)
            .x_desc("seconds since the phase started")
            .y_desc("ops/s")
            .y_label_formatter(&|v| fmt_rate(*v))
            .label_style(font(12, GREY))
            .axis_desc_style(font(13, GREY))
            .draw()?;
        let (mut ours, mut peer) = (0usize, 0usize);
        // The legend, right of the plot, a line per series.
        let x = (WIDTH - LEGEND_W + 24) as i32;
        for (i, (name, pts)) in phase.series.iter().enumerate() {
            let colour = if is_peer(name) {
                peer += 1;
                PEER[(peer - 1) % PEER.len()]
            } else {
                ours += 1;
                OURS[(ours - 1) % OURS.len()]
            };
            chart.draw_series(
                LineSeries::new(pts.iter().copied(), colour.stroke_width(2)).point_size(3),
            )?;
            let y = 24 + 22 * i as i32;
            root.draw(&PathElement::new(
                [(x, y), (x + 24, y)],
                colour.stroke_width(3),
            ))?;
            let style = font(13, RGBColor(0, 0, 0)).pos(Pos::new(HPos::Left, VPos::Center));
            root.draw(&Text::new(name.as_str(), (x + 32, y), style))?;
        }
        Ok(())
    })
}

/// Latency percentiles of every summary of a run: a row each, a bar per
/// percentile (log scale), ours in blues and the peer in oranges.
pub fn latency_chart(latencies: &[Latency]) -> Result<String> {
    let with_p999 = latencies.iter().any(|l| l.p999_us.is_some());
    let names: &[&str] = if with_p999 {
        &["p50", "p99", "p999", "max"]
    } else {
        &["p50", "p99", "max"]
    };
    let values = |l: &Latency| -> Vec<Option<f64>> {
        let mut v = vec![Some(l.p50_us), Some(l.p99_us)];
        if with_p999 {
            v.push(l.p999_us);
        }
        v.push(Some(l.max_us));
        v
    };
    const BAR_H: u32 = 7;
    let k = names.len();
    let row_h = k as u32 * BAR_H + 12;
    let n = latencies.len().max(1);
    let height = 40 + n as u32 * row_h + 50;
    let lo = latencies
        .iter()
        .map(|l| l.p50_us)
        .fold(f64::MAX, f64::min)
        .max(1.0)
        / 2.0;
    let hi = latencies.iter().map(|l| l.max_us).fold(1.0, f64::max) * 2.0;
    let any_peer = latencies.iter().any(|l| l.peer);
    svg((WIDTH, height), |root| {
        // The legend, above the chart.
        let mut x = LABEL_W as i32;
        let sides: &[(&str, &[RGBColor; 4])] = if any_peer {
            &[("ours", &OURS_SHADES), ("peer", &PEER_SHADES)]
        } else {
            &[("ours", &OURS_SHADES)]
        };
        for (side, shades) in sides {
            root.draw(&Text::new(*side, (x, 14), font(13, RGBColor(0, 0, 0))))?;
            x += 40;
            for (i, name) in names.iter().enumerate() {
                let shade = shades[shade_of(i, k)];
                root.draw(&Rectangle::new([(x, 14), (x + 14, 26)], shade.filled()))?;
                root.draw(&Text::new(*name, (x + 18, 14), font(12, GREY)))?;
                x += 64;
            }
            x += 30;
        }
        let mut chart = ChartBuilder::on(root)
            .margin_top(36)
            .margin_right(24)
            .x_label_area_size(40)
            .y_label_area_size(LABEL_W)
            .build_cartesian_2d(
                (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
                0f64..n as f64,
            )?;
        chart
            .configure_mesh()
            .disable_y_mesh()
            .y_labels(0)
            .x_label_formatter(&|v| fmt_us(*v))
            .light_line_style(RGBColor(245, 245, 245))
            .bold_line_style(LIGHT)
            .x_desc("latency (log scale)")
            .label_style(font(12, GREY))
            .axis_desc_style(font(13, GREY))
            .draw()?;
        let pad = 6.0 / row_h as f64;
        let bar = (1.0 - 2.0 * pad) / k as f64;
        for (i, l) in latencies.iter().enumerate() {
            let top = (n - i) as f64 - pad;
            let shades = if l.peer { &PEER_SHADES } else { &OURS_SHADES };
            for (j, v) in values(l).into_iter().enumerate() {
                let Some(v) = v else { continue };
                let y1 = top - j as f64 * bar;
                chart.draw_series([Rectangle::new(
                    [(lo, y1 - bar * 0.9), (v.max(lo), y1)],
                    shades[shade_of(j, k)].filled(),
                )])?;
            }
            let at = chart.backend_coord(&(lo, (n - i) as f64 - 0.5));
            let style = font(13, if l.peer { PEER[0] } else { RGBColor(0, 0, 0) })
                .pos(Pos::new(HPos::Right, VPos::Center));
            root.draw(&Text::new(l.label.as_str(), (at.0 - 8, at.1), style))?;
        }
        Ok(())
    })
}

/// Ticks of a log axis from `lo` to `hi`: 1, 2 and 5 per decade, or only
/// 1 where that would be more than a dozen.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let decades = || (lo.log10().floor() as i32..=hi.log10().ceil() as i32).map(|e| 10f64.powi(e));
    let within = |v: &f64| (lo..=hi).contains(v);
    let fine: Vec<f64> = decades()
        .flat_map(|d| [d, 2.0 * d, 5.0 * d])
        .filter(within)
        .collect();
    if fine.len() <= 12 {
        fine
    } else {
        decades().filter(within).collect()
    }
}

/// The shade of percentile `i` of `k`: the darkest is always max.
fn shade_of(i: usize, k: usize) -> usize {
    if k == 4 {
        i
    } else {
        [0, 1, 3][i.min(2)]
    }
}

/// Each ratio of one benchmark across its history records (oldest left,
/// labelled by commit), its target dashed, points pass / fail coloured.
/// `records` are the newest [`HISTORY_POINTS_MAX`] at most; keys past
/// [`HISTORY_KEYS_MAX`] are left out.
pub fn history_chart(bench: &str, records: &[&Record], keys: &[String]) -> Result<String> {
    const COLS: usize = 3;
    const CELL_H: u32 = 210;
    let cols = keys.len().clamp(1, COLS);
    let rows = keys.len().div_ceil(cols).max(1);
    let n = records.len();
    let commits: Vec<&str> = records.iter().map(|r| r.commit.as_str()).collect();
    svg((WIDTH, rows as u32 * CELL_H), |root| {
        let cells = root.split_evenly((rows, cols));
        for (key, cell) in keys.iter().zip(&cells) {
            let target = target_of(bench, key);
            let values: Vec<Option<f64>> = records
                .iter()
                .map(|r| r.ratios.get(key).copied().flatten())
                .collect();
            let (ylo, yhi) = history_range(&values, target);
            let caption = match target {
                Some(t) => format!("{key} ({t})"),
                None => key.clone(),
            };
            let mut chart = ChartBuilder::on(cell)
                .caption(caption, font(14, RGBColor(0, 0, 0)))
                .margin(8)
                .x_label_area_size(22)
                .y_label_area_size(56)
                .build_cartesian_2d(-0.5f64..n as f64 - 0.5, ylo..yhi)?;
            let label = |x: &f64| {
                let i = x.round();
                if (x - i).abs() < 0.01 && i >= 0.0 && (i as usize) < n {
                    commits[i as usize].to_owned()
                } else {
                    String::new()
                }
            };
            chart
                .configure_mesh()
                .x_labels(n.min(6))
                .x_label_formatter(&label)
                .y_labels(5)
                .y_label_formatter(&|v| fmt_axis(*v))
                .light_line_style(RGBColor(248, 248, 248))
                .bold_line_style(LIGHT)
                .label_style(font(11, GREY))
                .draw()?;
            if let Some(t) = target {
                chart.draw_series(DashedLineSeries::new(
                    [(-0.5, t.value), (n as f64 - 0.5, t.value)],
                    5,
                    4,
                    BLACK.stroke_width(1),
                ))?;
            }
            // A line through each stretch of records that have a value.
            for stretch in values
                .iter()
                .enumerate()
                .collect::<Vec<_>>()
                .split(|(_, v)| v.is_none())
            {
                let pts = stretch
                    .iter()
                    .filter_map(|(i, v)| v.map(|v| (*i as f64, v)));
                chart.draw_series(LineSeries::new(pts, NEUTRAL.stroke_width(2)))?;
            }
            chart.draw_series(values.iter().enumerate().filter_map(|(i, v)| {
                let v = (*v)?;
                let c = verdict_colour(Verdict::of(target, Some(v)));
                Some(Circle::new((i as f64, v), 4, c.filled()))
            }))?;
        }
        Ok(())
    })
}

/// The y range of a history cell: its values and its target, with room.
fn history_range(values: &[Option<f64>], target: Option<&Target>) -> (f64, f64) {
    let all = values
        .iter()
        .flatten()
        .copied()
        .chain(target.map(|t| t.value));
    let (lo, hi) = all.fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if lo > hi {
        return (0.0, 1.0);
    }
    let pad = if hi > lo {
        (hi - lo) * 0.12
    } else {
        hi.abs().max(1.0) * 0.5
    };
    // Counts at 0 sit a little above the axis, not on it.
    let bottom = if lo >= 0.0 {
        (lo - pad).max(-pad * 0.15)
    } else {
        lo - pad
    };
    (bottom, hi + pad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_hold_value_and_target() {
        let t = target_of("chaos", "acked_lost");
        assert_eq!(ratio_range(Some(0.0), t), (0.0, 1.0));
        let (lo, hi) = ratio_range(Some(0.4), target_of("e2e", "datagrams_vs_raw_udp"));
        assert!(lo == 0.0 && hi > 0.5);
        assert_eq!(history_range(&[None], None), (0.0, 1.0));
        let (lo, hi) = history_range(&[Some(3.0), Some(3.0)], None);
        assert!(lo < 3.0 && hi > 3.0 && lo >= 0.0);
    }

    #[test]
    fn odd_shapes_draw_without_panicking() {
        let run = Run {
            file: "f.json".into(),
            bench: "chaos".into(),
            ratios: vec![
                ("acked_lost".into(), Some(-5.0)),
                ("faults".into(), None),
                ("login_gap_ms_max".into(), Some(1e15)),
                ("other".into(), Some(0.0)),
            ],
            timeline: Vec::new(),
            latencies: Vec::new(),
            notes: Vec::new(),
        };
        assert!(ratios_chart(&run).unwrap().starts_with("<svg"));
        let phase = TimelinePhase {
            phase: "p".into(),
            series: vec![
                ("redis x".into(), vec![(0.0, -3.0)]),
                ("ours".into(), vec![]),
            ],
        };
        assert!(timeline_chart(&phase).unwrap().contains("</svg>"));
        let one = Latency {
            label: "a".into(),
            peer: false,
            p50_us: 1.0,
            p99_us: 1.0,
            p999_us: None,
            max_us: 1.0,
            samples: Some(1),
        };
        let huge = Latency {
            label: "disk".into(),
            peer: true,
            p999_us: Some(1e12),
            max_us: 1e12,
            ..one.clone()
        };
        assert!(latency_chart(&[one, huge]).unwrap().contains("</svg>"));
        let record = Record {
            commit: "c".into(),
            time: "t".into(),
            bench: "chaos".into(),
            ratios: [("faults".to_owned(), None), ("x".to_owned(), Some(-1.0))].into(),
        };
        let keys = ["faults".to_owned(), "x".to_owned()];
        assert!(history_chart("chaos", &[&record], &keys)
            .unwrap()
            .contains("</svg>"));
    }

    #[test]
    fn axis_labels_are_short() {
        assert_eq!(fmt_axis(0.25), "0.25");
        assert_eq!(fmt_axis(2.0), "2");
        assert_eq!(fmt_axis(25_000.0), "25.0k");
        assert_eq!(fmt_us(1500.0), "1.5 ms");
        assert_eq!(log_ticks(2200.0, 84_000.0), [5e3, 1e4, 2e4, 5e4]);
        assert_eq!(log_ticks(1.0, 1e9).len(), 10);
    }
}
