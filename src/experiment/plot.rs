//! PNG line charts of the experiments (plotters, bitmap backend).
//!
//! Text is drawn by plotters' `ab_glyph` font backend from a font compiled into the binary
//! (Hack, through `epaint_default_fonts`), registered once as the family `sans-serif`: no system
//! fonts and no fontconfig are needed, so the plots look the same on every machine.
//!
//! Every chart is a set of named series of `(x, y)` points, each with optional marks (the
//! moments a run grew, drawn as triangles on its curve). The y range either holds every point
//! of every series ([`YRange::Whole`], [`y_range_whole`]: the jump at growth and each run's whole
//! pre-growth phase are visible), or is cut at [`y_range`]'s upper bound ([`YRange::Late`]) so
//! that the late region where the runs differ by hundredths is readable; the experiments draw
//! both.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::Once;

const FONT: &str = "sans-serif";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            // The bytes are a valid TrueType font shipped inside the crate; failure is a bug.
            plotters::style::register_font(FONT, style, epaint_default_fonts::HACK_REGULAR)
                .unwrap_or_else(|_| panic!("the built-in font does not parse"));
        }
    });
}

/// The size of every experiment plot, in pixels (small PNGs: ~50–90 KB).
pub const SIZE: (u32, u32) = (720, 432);

/// One line of a chart.
#[derive(Clone, Debug, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Points drawn as triangles on the line (where the run grew).
    pub marks: Vec<(f64, f64)>,
}

/// How the y axis is bounded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum YRange {
    /// Every point of every series.
    #[default]
    Whole,
    /// Cut above the late, close part of the curves ([`y_range`]).
    Late,
}

/// How the x axis is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum XScale {
    Linear,
    Log,
}

/// A chart: title, axis names, lines.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_scale: XScale,
    pub series: Vec<Series>,
    /// Draw a marker on every point (for sparse curves like loss against τ).
    pub markers: bool,
    /// Where the legend goes.
    pub legend: Legend,
    pub y_range: YRange,
}

/// The corner of the legend box.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Legend {
    #[default]
    UpperRight,
    UpperLeft,
}

/// The colours of successive series (a colour-blind-safe palette, Okabe–Ito).
const PALETTE: [RGBColor; 12] = [
    RGBColor(0, 0, 0),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(240, 228, 66),
    // beyond the 8 colour-blind-safe ones: the recipe ablation draws 10 curves
    RGBColor(128, 128, 128),
    RGBColor(120, 60, 160),
    RGBColor(0, 90, 40),
    RGBColor(150, 90, 40),
];

/// The y range: from just below the lowest point to a cut that keeps the late, close part of
/// the curves readable (the lowest final value plus three times the spread of final values,
/// at least 0.4 nats above the lowest point), never above the highest point.
pub fn y_range(series: &[Series]) -> (f64, f64) {
    let ys = || series.iter().flat_map(|s| s.points.iter().map(|p| p.1)).filter(|y| y.is_finite());
    let lo = ys().fold(f64::INFINITY, f64::min);
    let hi = ys().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let finals: Vec<f64> = series.iter().filter_map(|s| s.points.last().map(|p| p.1)).filter(|y| y.is_finite()).collect();
    let (fmin, fmax) = finals.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &y| (a.min(y), b.max(y)));
    let cut = (fmax + 2.0 * (fmax - fmin)).max(lo + 0.4);
    let top = cut.min(hi).max(lo + 1e-3);
    let pad = 0.03 * (top - lo);
    (lo - pad, top + pad)
}

/// The y range holding every point of every series (and its marks), with a little padding.
pub fn y_range_whole(series: &[Series]) -> (f64, f64) {
    let ys = || series.iter().flat_map(|s| s.points.iter().chain(s.marks.iter()).map(|p| p.1)).filter(|y| y.is_finite());
    let lo = ys().fold(f64::INFINITY, f64::min);
    let hi = ys().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return (0.0, 1.0);
    }
    let top = hi.max(lo + 1e-3);
    let pad = 0.03 * (top - lo);
    (lo - pad, top + pad)
}

/// Render `chart` to a PNG of `size` pixels at `path`.
pub fn render(chart: &Chart, path: &Path, size: (u32, u32)) -> Result<()> {
    register_font();
    let pts = || chart.series.iter().flat_map(|s| s.points.iter().copied()).filter(|(x, y)| x.is_finite() && y.is_finite());
    if pts().next().is_none() {
        return Err(anyhow!("chart {:?} has no points", chart.title));
    }
    let (y0, y1) = match chart.y_range {
        YRange::Whole => y_range_whole(&chart.series),
        YRange::Late => y_range(&chart.series),
    };
    let xs = || pts().map(|p| p.0).filter(|&x| chart.x_scale == XScale::Linear || x > 0.0);
    let x0 = xs().fold(f64::INFINITY, f64::min);
    let x1 = xs().fold(f64::NEG_INFINITY, f64::max);
    let x1 = if x1 > x0 { x1 } else { x0 + 1.0 };
    let root = BitMapBackend::new(path, size).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut builder = ChartBuilder::on(&root);
    builder.caption(&chart.title, (FONT, 20)).margin(12).x_label_area_size(42).y_label_area_size(64);
    // A log axis within one decade has no power of ten inside to label: draw it linear.
    let scale = if chart.x_scale == XScale::Log && x1 / x0 < 10.0 { XScale::Linear } else { chart.x_scale };
    let sci_labels = chart.x_scale == XScale::Log;
    match scale {
        XScale::Linear => {
            let mut c = builder.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| anyhow!("{e}"))?;
            let whole = x1 - x0 >= 20.0;
            c.configure_mesh()
                .x_desc(&chart.x_label)
                .y_desc(&chart.y_label)
                .label_style((FONT, 13))
                .x_labels(8)
                .max_light_lines(1)
                .x_label_formatter(&|x| {
                    if sci_labels {
                        format!("{x:.1e}")
                    } else if whole {
                        format!("{x:.0}")
                    } else {
                        format!("{x:.2}")
                    }
                })
                .y_labels(8)
                .y_label_formatter(&|y| format!("{y:.2}"))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            draw_lines(&mut c, chart, y0, y1)?;
        }
        XScale::Log => {
            let mut c = builder.build_cartesian_2d((x0..x1).log_scale(), y0..y1).map_err(|e| anyhow!("{e}"))?;
            c.configure_mesh()
                .x_desc(&chart.x_label)
                .y_desc(&chart.y_label)
                .label_style((FONT, 13))
                .x_label_formatter(&|x| format!("{x:.0e}"))
                .x_labels(6)
                .max_light_lines(1)
                .y_labels(8)
                .y_label_formatter(&|y| format!("{y:.2}"))
                .draw()
                .map_err(|e| anyhow!("{e}"))?;
            draw_lines(&mut c, chart, y0, y1)?;
        }
    }
    root.present().map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn draw_lines<'a, X>(
    c: &mut ChartContext<'a, BitMapBackend<'a>, Cartesian2d<X, plotters::coord::types::RangedCoordf64>>,
    chart: &Chart,
    y0: f64,
    y1: f64,
) -> Result<()>
where
    X: Ranged<ValueType = f64>,
{
    for (i, s) in chart.series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        // points above the cut are clamped to it, so a line leaves the plot at its top edge
        let pts: Vec<(f64, f64)> =
            s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).map(|(x, y)| (x, y.clamp(y0, y1))).collect();
        let style = ShapeStyle::from(&color).stroke_width(2);
        c.draw_series(LineSeries::new(pts.clone(), style))
            .map_err(|e| anyhow!("{e}"))?
            .label(s.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], ShapeStyle::from(&color).stroke_width(2)));
        if chart.markers {
            c.draw_series(pts.iter().map(|&p| Circle::new(p, 3, color.filled()))).map_err(|e| anyhow!("{e}"))?;
        }
        let marks: Vec<(f64, f64)> =
            s.marks.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite() && *y >= y0 && *y <= y1).collect();
        c.draw_series(marks.iter().map(|&p| TriangleMarker::new(p, 7, color.filled()))).map_err(|e| anyhow!("{e}"))?;
    }
    c.configure_series_labels()
        .position(match chart.legend {
            Legend::UpperRight => SeriesLabelPosition::UpperRight,
            Legend::UpperLeft => SeriesLabelPosition::UpperLeft,
        })
        .label_font((FONT, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn y_range_cuts_the_fresh_model_losses() {
        let s = vec![
            Series { label: "a".into(), points: vec![(1.0, 5.5), (2.0, 2.0), (3.0, 1.6)], ..Default::default() },
            Series { label: "b".into(), points: vec![(1.0, 5.5), (2.0, 2.1), (3.0, 1.62)], ..Default::default() },
        ];
        let (lo, hi) = y_range(&s);
        assert!(lo < 1.6 && lo > 1.5, "{lo}");
        assert!(hi < 2.1 && hi > 1.99, "{hi}");
    }

    #[test]
    fn y_range_whole_holds_every_point_and_mark() {
        let s = vec![
            Series { label: "fixed".into(), points: vec![(0.0, 5.5), (10.0, 2.0), (20.0, 1.6)], ..Default::default() },
            // a grown run: flat before growth at step 10, a jump up, then down
            Series { label: "0→6".into(), points: vec![(0.0, 5.5), (10.0, 2.4), (12.0, 3.1), (20.0, 1.7)], marks: vec![(10.0, 2.4)] },
        ];
        let (lo, hi) = y_range_whole(&s);
        assert!(lo < 1.6 && hi > 5.5, "({lo}, {hi}) cuts a point");
        let (_, cut) = y_range(&s);
        assert!(cut < 5.5, "the late range still cuts the fresh model's loss: {cut}");
    }

    #[test]
    fn renders_a_png_with_text() {
        let dir = std::env::temp_dir().join(format!("taproot-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chart = Chart {
            title: "loss".into(),
            x_label: "step".into(),
            y_label: "val loss".into(),
            x_scale: XScale::Log,
            series: vec![Series { label: "fixed".into(), points: vec![(1.0, 3.0), (10.0, 2.0), (100.0, 1.5)], marks: vec![(10.0, 2.0)] }],
            markers: true,
            legend: Legend::UpperLeft,
            y_range: YRange::Whole,
        };
        let p = dir.join("a.png");
        render(&chart, &p, (480, 320)).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
        std::fs::remove_dir_all(&dir).ok();
    }
}
